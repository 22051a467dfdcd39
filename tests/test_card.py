"""The merged model card says what reproduces the merge (packages and versions) and whom to
cite (each method's paper as BibTeX). Real ``mergekit-yaml``/``mergekit-multi`` cards are
checked in test_examples.py and test_config_check.py with :func:`tests.helpers.assert_credits`."""

import re

import pytest
from mergekit.config import MergeConfiguration

from mergekit_ace.card import SECTION_TITLE, card_section, extend_card
from mergekit_ace.methods import METHODS, our_method
from tests.helpers import assert_credits

ARXIV = {
    "ace": "2603.02945",
    "actmat": "2604.01329",
    "tsv": "2412.00081",
    "iso_c": "2502.04959",
    "iso_cts": "2502.04959",
}


def config(method: str, models=("e1", "e2")) -> MergeConfiguration:
    return MergeConfiguration.model_validate(
        {"merge_method": method, "base_model": "base", "models": [{"model": m} for m in models]}
    )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_is_credited_with_its_paper(method):
    citation = our_method(method).citation
    assert re.search(r"eprint\s*=\s*\{" + re.escape(ARXIV[method]) + r"\}", citation)
    assert ARXIV[method] in our_method(method).spec.reference_url
    assert citation.count("{") == citation.count("}")
    assert re.match(r"@\w+\{\w+,\n(  \w+\s*= \{.*\},\n)+\}$", citation), citation
    section = card_section(config(method))
    assert section.startswith(SECTION_TITLE)
    assert_credits(extend_card(config(method), "mergekit's card\n"), method)


def test_iso_c_and_iso_cts_share_one_paper():
    assert our_method("iso_c").citation == our_method("iso_cts").citation


def test_mergekit_methods_leave_the_card_alone():
    card = "mergekit's card\n"
    assert extend_card(config("linear"), card) == card
    assert extend_card(config("ties"), card) == card


def test_an_earlier_ace_stage_is_credited(tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "mergekit_config.yml").write_text(
        "merge_method: ace\nbase_model: base\nmodels: [{model: e1}, {model: e2}]\n"
    )
    card = extend_card(config("slerp", models=(str(stage), "chat")), "card\n")
    assert_credits(card, "ace")
    assert f"The input `{stage}` was itself merged with [ACE-Merging]" in card
    assert "merge_method: ace\nbase_model: base" in card
    # a stage made by a mergekit method is not credited
    (stage / "mergekit_config.yml").write_text(
        "merge_method: linear\nmodels: [{model: e1}, {model: e2}]\n"
    )
    assert extend_card(config("slerp", models=(str(stage), "chat")), "card\n") == "card\n"
