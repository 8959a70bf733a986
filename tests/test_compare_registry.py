import dataclasses

import pytest

from itda.comparison import CompareConfig, compare_models, registry  # noqa: F401 - exported
from itda.comparison.cka_grids import choose_grid
from itda.comparison.itda_measures import ITDA_MEASURES, PER_TOKEN
from itda.comparison.measures import _FACTORIES, IN_MEMORY, MEASURES, STREAMED
from itda.comparison.minibatch import MinibatchCKAGrid, exact_grid_bytes
from itda.comparison.plan import GRAM_MEMORY, make_plan
from itda.errors import ItdaInputError


def test_every_name_has_one_entry_and_the_lists_come_from_it():
    assert len(registry.REGISTRY) == 18
    assert STREAMED == ("cka", "cka_debiased", "procrustes") and MEASURES == STREAMED + IN_MEMORY
    assert set(IN_MEMORY) == set(_FACTORIES)  # every kept-rows measure has its (prepare, pair)
    assert set(ITDA_MEASURES) == set(registry.names_of(registry.PER_TOKEN, registry.ITDA_KEPT_ROWS))
    assert all(registry.SECOND_PASS in registry.REGISTRY[m].needs for m in PER_TOKEN)
    assert registry.DEFAULT_MEASURES == (
        "jaccard",
        "itda_fused",
        "itda_recon_cka",
        "cka",
        "procrustes",
        "svcca",
        "relative",
    )
    help_text = registry.measures_help()
    assert all(name in help_text for name in registry.REGISTRY)


def test_check_and_expand():
    registry.check_measures(list(registry.REGISTRY))
    with pytest.raises(ItdaInputError, match="unknown measures: cosmic"):
        registry.check_measures(["cka", "cosmic"])
    assert registry.expand_measures(["jaccard", "cka", "cka_debiased"]) == ["jaccard", "cka", "cka_debiased"]
    assert registry.expand_measures(["svcca", "cka"]) == ["svcca", "cka", "cka_debiased"]


def test_config_validates_and_plan_chooses_estimators_up_front():
    with pytest.raises(ItdaInputError, match="unknown measures"):
        CompareConfig(measures=["cosmic"])
    with pytest.raises(ItdaInputError, match="precision"):
        CompareConfig(precision="float16")
    cfg = CompareConfig(measures=["svcca", "cka", "itda_relative", "itda_fused", "jaccard"], max_rows=100)
    plan = make_plan(cfg, 4, 16, 3, 8)
    assert plan.streamed == ("cka",) and plan.kept_rows == ("svcca",) and plan.itda_kept_rows == ("itda_relative",)
    assert plan.per_token == ("itda_fused",) and plan.second_pass and plan.jaccard
    assert plan.raw_grid.exact and plan.raw_grid.exact_bytes == exact_grid_bytes(4, 16, 3, 8)
    by_name = {e.name: e for e in plan.estimators}
    # float16 unit rows (the norms, one float per layer and row, are not counted)
    assert by_name["kept_rows"].bytes == 2 * 100 * (4 * 16 + 3 * 8)
    assert by_name["per_token_grid"].passes == (1, 2) and by_name["jaccard_dictionaries"].bytes is None
    # the dictionaries' Gram matrices and a chunk's activations are bounded up front
    assert by_name["dictionary_grams"].bytes == plan.gram_memory == GRAM_MEMORY
    assert by_name["dictionary_grams"].measures == ("jaccard", "itda_fused")
    # the chunk's float16 unit rows and one 512-row slice of dense float32 paired rows
    assert by_name["chunk_activations"].bytes == (2 * cfg.batch_tokens + 4 * 512) * (4 * 16 + 3 * 8)
    assert plan.bytes == sum(e.bytes or 0 for e in plan.estimators)
    assert plan.notes()[0].startswith("linear CKA: exact streaming")
    small = make_plan(dataclasses.replace(cfg, cka_memory=1, cka_minibatch=64), 4, 16, 3, 8)
    assert not small.raw_grid.exact and not small.per_token_grid.exact
    assert {e.name: e for e in small.estimators}["cka_grid"].measures == ("cka_minibatch",)
    assert {e.name: e for e in small.estimators}["cka_grid"].bytes == MinibatchCKAGrid.memory_bytes(4, 3, 64)
    assert any("itda per-token CKA measures: minibatch" in n for n in small.notes())


def test_exact_and_minibatch_grids_share_one_interface():
    import torch

    from itda.comparison.cka_grids import make_grid

    xs, ys = torch.randn(2, 64, 5, dtype=torch.float64), torch.randn(3, 64, 4, dtype=torch.float64)
    for memory in (None, 1):
        grid = make_grid(choose_grid(2, 5, 3, 4, memory, 16))
        grid.update(xs, ys)
        m = grid.matrices(procrustes=False)
        assert m["cka"].shape == (2, 3) and grid.needs_pilots is False
