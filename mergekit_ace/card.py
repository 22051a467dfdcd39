"""What the merged model card adds when a merge used this package's methods: the packages and
versions that reproduce it, and the BibTeX entry of each method's paper.

mergekit writes the card (README.md) from its own template, which names the method and links
its paper; :func:`extend_card` is hooked into that step by :mod:`mergekit_ace.compat`. In a
``mergekit-multi`` recipe the final stage's config names an earlier stage only by its output
directory; that directory's ``mergekit_config.yml`` (written by mergekit beside every merge)
says which method made it, so a final SLERP of an ACE merge still credits ACE.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Set, Tuple

import yaml

from mergekit_ace.methods import is_ours, our_method
from mergekit_ace.version import __version__

PACKAGE = "mergekit-ace"
SECTION_TITLE = "## Reproducing this merge"


def package_versions() -> Tuple[str, str]:
    """Installed versions of mergekit and of this package."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version(PACKAGE)
    except PackageNotFoundError:  # a source tree on sys.path
        ours = __version__
    return version("mergekit"), ours


def _stage(model: Any) -> Optional[Tuple[str, Any, str]]:
    """(path, MergeConfiguration, YAML text) of a local model directory that mergekit merged."""
    from mergekit.config import MergeConfiguration

    path = model.model.path
    config_file = os.path.join(path, "mergekit_config.yml")
    if not os.path.isfile(config_file):
        return None
    with open(config_file, "r", encoding="utf-8") as fp:
        text = fp.read()
    try:
        return path, MergeConfiguration.model_validate(yaml.safe_load(text)), text.strip()
    except Exception:  # not a mergekit-yaml config we can read: nothing to credit
        return None


def _earlier_stages(config: Any, seen: Set[str]) -> List[Tuple[str, str, str]]:
    """(path, merge_method, YAML) of every earlier merge, at any depth, that one of this
    package's methods made and ``config`` builds on."""
    found = []
    for model in config.referenced_models():
        stage = _stage(model)
        if stage is None or stage[0] in seen:
            continue
        seen.add(stage[0])
        path, stage_config, text = stage
        found.extend(_earlier_stages(stage_config, seen))
        if is_ours(stage_config.merge_method):
            found.append((path, stage_config.merge_method, text))
    return found


def _method_link(name: str) -> str:
    spec = our_method(name).spec
    return f"[{spec.pretty_name}]({spec.reference_url}) (`merge_method: {name}`)"


def card_section(config: Any) -> str:
    """The card section for a merge with ``config``; empty when no method of this package
    took part."""
    stages = _earlier_stages(config, set())
    direct = is_ours(config.merge_method)
    if not direct and not stages:
        return ""
    mergekit_version, our_version = package_versions()
    lines = [SECTION_TITLE, ""]
    if direct:
        lines.append(
            f"This model was merged with {_method_link(config.merge_method)}, which "
            f"mergekit runs from the [{PACKAGE}](https://pypi.org/project/{PACKAGE}/) "
            "package. To merge it again from the configuration above (after installing "
            "PyTorch for your platform):"
        )
        lines += [
            "",
            "```sh",
            f"pip install mergekit=={mergekit_version} {PACKAGE}=={our_version}",
            "mergekit-yaml mergekit_config.yml ./merged",
            "```",
            "",
        ]
    for path, method, text in stages:
        lines.append(
            f"The input `{path}` was itself merged with {_method_link(method)} from "
            f"the [{PACKAGE}](https://pypi.org/project/{PACKAGE}/) package "
            f"(`pip install mergekit=={mergekit_version} {PACKAGE}=={our_version}`), "
            "with this configuration:"
        )
        lines += ["", "```yaml", text, "```", ""]
    methods: Dict[str, None] = dict.fromkeys(
        ([config.merge_method] if direct else []) + [method for _, method, _ in stages]
    )
    citations = list(dict.fromkeys(our_method(m).citation for m in methods))
    lines += [
        "### Citation",
        "",
        "If you use this model, please cite the paper of the merge method"
        + ("s" if len(citations) > 1 else "")
        + ":",
        "",
    ]
    for citation in citations:
        lines += ["```bibtex", citation, "```", ""]
    return "\n".join(lines)


def extend_card(config: Any, card: str) -> str:
    section = card_section(config)
    if not section:
        return card
    return card.rstrip("\n") + "\n\n" + section
