import pytest

from tests.tiny_models import build_tiny_family


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """Paths of a tiny Llama base, three experts and an expert that adds two tokens."""
    return build_tiny_family(tmp_path_factory.mktemp("tiny_llamas"), extra_token_expert=True)
