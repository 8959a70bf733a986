"""What a model comparison will run, decided before the first forward pass.

`CompareConfig` holds every option of `itda compare` for two models; `make_plan` reads the
measure registry and the models' shapes and decides which estimators run, which CKA grids are
exact and which fall back to minibatch past `cka_memory`, which need the second pass, and the
accumulator bytes of each: with a document chunk's activations and the Gram budget of the ITDA
dictionaries (GRAM_MEMORY) all are bounded up front except the dictionaries' atoms, which grow
with them. The run reports the plan's notes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import itda.comparison.registry as registry
from itda.activations.stream import STREAM_DTYPES
from itda.builder.builder import BuildConfig
from itda.comparison.cka_grids import GridChoice, choose_grid, grid_bytes
from itda.configfields import FieldError, choice
from itda.dictionary import DEFAULT_K

GiB = 2**30
# bytes the Gram matrices of the ITDA dictionaries keep, all layers together: pass 1's builders
# between updates (itda.pursuit.gram.GramPool), pass 2's leave-one-out encoders; past it a
# dictionary's Gram is rebuilt for each use
GRAM_MEMORY = 256 << 20
ROW_SLICE = 512  # paired tokens the passes feed their CKA grids at a time
# paired tokens pass 2 encodes at a time (a multiple of ROW_SLICE: the grids see the same slices, so
# the sums are the same bits as whole chunks'; the minibatch grids carry rows over between updates)
PASS2_ROWS = 1024


@dataclass(frozen=True)
class CompareConfig:
    """Every option `itda compare` takes when it compares two models (each field's help: its metadata)."""

    tokens: int = choice(20_000, "tokens of A to read")
    measures: tuple[str, ...] = choice(registry.DEFAULT_MEASURES, "measure names (itda.comparison.registry)")
    context: int = choice(128, "tokens per context")
    batch_tokens: int = choice(
        4096,
        "tokens per forward pass (a document chunk; the first centres the per-token "
        "ITDA measures; the unit torchrun ranks share out)",
    )
    k: int = choice(DEFAULT_K, "MP steps of the ITDA dictionaries (Jaccard, ITDA measures)")
    min_cosine: float = choice(BuildConfig.DEFAULT_MIN_COSINE, "dictionary threshold (Jaccard, ITDA measures)")
    max_rows: int = choice(4096, "paired rows kept for the kept-rows measures (not the per-token ones)")
    precision: str = choice("float64", "streaming CKA cross products: float64 (exact) or float32 (faster)")
    include_special: bool = choice(False, "keep BOS/special tokens (they can dominate CKA)")
    stream_dtype: str = choice(
        "float16", "unit rows of a chunk's activations, as `itda build` streams them: float16, bfloat16 or float32"
    )
    cka_memory: int = choice(1 << 30, "largest exact CKA accumulators in bytes, each grid; past it minibatch CKA")
    cka_minibatch: int = choice(1024, "paired tokens per minibatch of the minibatch CKA estimator")

    def __post_init__(self):
        object.__setattr__(self, "measures", tuple(self.measures))
        registry.check_measures(self.measures)
        if self.stream_dtype not in STREAM_DTYPES:
            raise FieldError("stream_dtype", f"must be one of {', '.join(STREAM_DTYPES)}, got {self.stream_dtype!r}")
        if self.precision not in ("float64", "float32"):
            raise FieldError("precision", f"must be float64 or float32, got {self.precision!r}")
        # unbiased HSIC needs minibatches of m >= 4 rows
        lowest = {
            "tokens": 1,
            "context": 1,
            "batch_tokens": 1,
            "k": 1,
            "max_rows": 4,
            "cka_memory": 1,
            "cka_minibatch": 4,
        }
        for name, low in lowest.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FieldError(name, f"must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class Estimator:
    """One accumulator a comparison runs: its measures, the pass that feeds it, its bytes (None: grows)."""

    name: str
    measures: tuple[str, ...]
    passes: tuple[int, ...]
    exact: bool
    bytes: int | None


@dataclass
class ComparePlan:
    """The estimators of one comparison and why they were chosen (`notes`)."""

    config: CompareConfig
    streamed: tuple[str, ...]  # raw CKA grid measures asked for (registry.STREAMED)
    kept_rows: tuple[str, ...]  # similarity_grid measures, in the order asked
    itda_kept_rows: tuple[str, ...]  # itda_grids measures on the kept rows, in the order asked
    per_token: tuple[str, ...]  # PerTokenGrid measures (second pass), in the order asked
    jaccard: bool
    raw_grid: GridChoice | None
    per_token_grid: GridChoice | None
    estimators: list[Estimator] = field(default_factory=list)
    gram_memory: int = GRAM_MEMORY  # the ITDA dictionaries' Gram matrices, all layers together

    @property
    def keeps_rows(self) -> bool:
        """Whether the first pass keeps max_rows paired rows (kept-rows measures, baseline or ITDA)."""
        return bool(self.kept_rows or self.itda_kept_rows)

    @property
    def second_pass(self) -> bool:
        return bool(self.per_token)

    @property
    def bytes(self) -> int:
        """The estimators' bytes that are known up front (the dictionaries' atoms grow with them)."""
        return sum(e.bytes or 0 for e in self.estimators)

    def notes(self) -> list[str]:
        """What the run reports about its estimators, in order."""
        out = []
        if self.raw_grid is not None:
            out.append(_raw_grid_note(self.raw_grid))
        if self.per_token:
            out.append(
                "itda per-token measures: every paired token, second pass over the corpus, leave-one-out MP "
                "over dictionaries of the layer's rows centred by the first document chunk's mean"
            )
            assert self.per_token_grid is not None  # make_plan chooses it whenever per_token is asked
            if not self.per_token_grid.exact:
                out.append(_per_token_grid_note(self.per_token_grid))
        return out


def _raw_grid_note(choice: GridChoice) -> str:
    if choice.exact:
        return f"linear CKA: exact streaming ({choice.exact_bytes / GiB:.2f} GiB of accumulators)"
    assert choice.memory is not None  # without a budget the grid is always exact
    return (
        f"linear CKA: minibatch estimator, {choice.minibatch} tokens per minibatch (the exact accumulators "
        f"would need {choice.exact_bytes / GiB:.1f} GiB > {choice.memory / GiB:.1f} GiB); reported as "
        "cka_minibatch; procrustes needs the exact path"
    )


def _per_token_grid_note(choice: GridChoice) -> str:
    assert choice.memory is not None  # only the minibatch grid gets this note: it had a budget
    return (
        f"itda per-token CKA measures: minibatch estimator, {choice.minibatch} tokens per minibatch (exact "
        f"accumulators would need {choice.exact_bytes / GiB:.1f} GiB each > {choice.memory / GiB:.1f} GiB); "
        "itda_scaled_procrustes needs the exact path (not computed); itda_fused from itda_scaled_cka and the "
        "norm profile"
    )


def _asked(config: CompareConfig, *kinds: str) -> tuple[str, ...]:
    return tuple(m for m in config.measures if registry.REGISTRY[m].kind in kinds)


def make_plan(config: CompareConfig, layers_a: int, d_a: int, layers_b: int, d_b: int) -> ComparePlan:
    """The estimators for these measures and models: (L_A layers of width d_A) against (L_B, d_B)."""
    streamed = tuple(m for m in registry.names_of(registry.STREAMED) if m in config.measures)
    per_token = _asked(config, registry.PER_TOKEN)

    def grid_if(wanted) -> GridChoice | None:
        return choose_grid(layers_a, d_a, layers_b, d_b, config.cka_memory, config.cka_minibatch) if wanted else None

    plan = ComparePlan(
        config,
        streamed,
        _asked(config, registry.KEPT_ROWS),
        _asked(config, registry.ITDA_KEPT_ROWS),
        per_token,
        "jaccard" in config.measures,
        grid_if(streamed),
        grid_if(per_token),
    )
    plan.estimators = _estimators(plan, layers_a * d_a + layers_b * d_b)
    return plan


def _estimators(plan: ComparePlan, row_width: int) -> list[Estimator]:
    """The plan's accumulators; row_width: floats per paired row over all layers of both models."""
    out = []
    if plan.raw_grid is not None:
        names = plan.streamed if plan.raw_grid.exact else ("cka_minibatch",)
        out.append(Estimator("cka_grid", names, (1,), plan.raw_grid.exact, grid_bytes(plan.raw_grid)))
    if plan.keeps_rows:
        out.append(
            Estimator(
                "kept_rows",
                plan.kept_rows + plan.itda_kept_rows,
                (1,),
                True,
                STREAM_DTYPES[plan.config.stream_dtype].itemsize * plan.config.max_rows * row_width,
            )
        )
    cfg = plan.config
    out.append(
        Estimator("chunk_activations", (), (1, 2) if plan.second_pass else (1,), True, chunk_bytes(cfg, row_width))
    )
    if plan.jaccard:
        out.append(Estimator("jaccard_dictionaries", ("jaccard",), (1,), True, None))
    if plan.jaccard or plan.per_token:
        names = (("jaccard",) if plan.jaccard else ()) + plan.per_token
        out.append(Estimator("dictionary_grams", names, (1, 2) if plan.per_token else (1,), True, plan.gram_memory))
    if plan.per_token:
        assert plan.per_token_grid is not None  # make_plan chooses it whenever per_token is asked
        grids = sum(
            1
            for wanted in (("itda_recon_cka",), ("itda_scaled_cka", "itda_scaled_procrustes", "itda_fused"))
            if set(wanted) & set(plan.per_token)
        )
        out.append(
            Estimator(
                "per_token_grid",
                plan.per_token,
                (1, 2),
                plan.per_token_grid.exact,
                grids * grid_bytes(plan.per_token_grid) + per_token_slice_bytes(cfg, row_width),
            )
        )
    return out


def chunk_bytes(config: CompareConfig, row_width: int) -> int:
    """One document chunk's activations of both models: the forward's unit rows (stream_dtype; the
    float32 norms, one per layer and token, not counted) and one ROW_SLICE of paired dense float32
    rows (row_width floats per token)."""
    unit = STREAM_DTYPES[config.stream_dtype].itemsize
    return unit * config.batch_tokens * row_width + 4 * min(ROW_SLICE, config.batch_tokens) * row_width


def per_token_slice_bytes(config: CompareConfig, row_width: int) -> int:
    """Pass 2's working rows: the unit reconstructions of PASS2_ROWS tokens (float32) and, per slice
    of ROW_SLICE tokens, their scaled float64 copies."""
    rows = min(PASS2_ROWS, config.batch_tokens)
    return 4 * rows * row_width + 8 * min(ROW_SLICE, config.batch_tokens) * row_width
