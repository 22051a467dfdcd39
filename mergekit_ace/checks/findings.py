"""What a check finds, and the nearest valid name for a misspelled one."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import List, Optional, Sequence


@dataclass(frozen=True)
class Finding:
    """One finding: ``where`` it was written ("global parameters", "model `expert-a`",
    "slices[0], model `x`, filter `mlp`", "tokenizer"), the ``name`` as written and the
    ``message`` (which says both, and what to write instead). ``error``: mergekit stops on it
    (an invalid value, a missing base, an unknown method); otherwise mergekit accepts it and
    merges something other than what was written, without a word."""

    where: str
    name: str
    message: str
    error: bool = False

    def __str__(self) -> str:
        return self.message

    def labelled(self, label: str) -> "Finding":
        """The same finding, its message prefixed with ``label`` (``"[stage] "``)."""
        if not label:
            return self
        return Finding(self.where, self.name, label + self.message, self.error)


def nearest(name: str, choices: Sequence[str], cutoff: float = 0.6) -> Optional[str]:
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=cutoff)
    return match[0] if match else None


def did_you_mean(name: str, choices: Sequence[str]) -> str:
    """``"; did you mean `x`?"`` or ``"."``."""
    hint = nearest(name, choices)
    return f"; did you mean `{hint}`?" if hint else "."


def errors(findings: List[Finding]) -> List[Finding]:
    return [f for f in findings if f.error]
