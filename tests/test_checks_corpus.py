"""No false alarms: valid configs, written as mergekit's users write them (every common
method, slices, filters and gradients, per-model density/epsilon/gamma, `@revision`,
`+lora`, `modules:`, `tokenizer:` with `tokens`, `tokenizer_source`, `chat_template`, YAML
anchors, multi-document recipes), and this package's examples give no finding and exit 0."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = sorted((ROOT / "tests" / "data" / "valid_configs").glob("*.yml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yml"))


def check(path):
    from click.testing import CliRunner

    from mergekit_ace.cli import main

    return CliRunner().invoke(main, ["check", str(path)])


def test_the_corpus_is_there():
    assert len(CORPUS) >= 18 and len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", CORPUS + EXAMPLES, ids=lambda p: p.name)
def test_valid_config_gives_no_finding(path):
    result = check(path)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{path}: no findings.", result.output


def test_the_same_configs_with_one_mistake_each_are_caught(tmp_path):
    """The corpus test can fail: one misspelled key per config is found in every one."""
    for path in CORPUS:
        text = path.read_text().replace("merge_method:", "merge_methd:", 1)
        broken = tmp_path / path.name
        broken.write_text(text)
        result = check(broken)
        assert result.exit_code == 2, (path.name, result.output)
        assert "`merge_methd` (top level) is not a configuration key" in result.stdout
