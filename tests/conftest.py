import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    from itda.activations.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_contexts(smollm2):
    from itda.activations.corpus import load_contexts

    return load_contexts(
        "default", smollm2.tokenizer, tokenizer_name=smollm2.tokenizer_name, split="train", tokens=2048
    )
