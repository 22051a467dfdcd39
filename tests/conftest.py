import pytest

from tests.helpers import overlap_inputs
from tests.tiny_models import build_tiny_family


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """Paths of a tiny Llama base, three experts and an expert that adds two tokens."""
    return build_tiny_family(tmp_path_factory.mktemp("tiny_llamas"), extra_token_expert=True)


@pytest.fixture(scope="session")
def more_inputs(tiny_family, tmp_path_factory):
    """pytorch_model.bin copies of the tiny family, a LoRA adapter of the base, an expert whose
    last shard was cut short and an expert that adds one token (:func:`overlap_inputs`)."""
    return overlap_inputs(tiny_family, tmp_path_factory.mktemp("overlap_inputs"))
