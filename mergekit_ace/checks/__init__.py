"""Checks of merge configurations: what mergekit would silently ignore or rewrite, and what
would stop it, each reported with where it was written and what to write instead.

Used by ``mergekit-ace check`` (:func:`check_file`) and, before any checkpoint is read, by
every merge with this package's methods (:mod:`mergekit_ace.checks.at_merge`, hooked into
mergekit by :mod:`mergekit_ace.compat`).

- :mod:`~mergekit_ace.checks.findings`: what a finding is;
- :mod:`~mergekit_ace.checks.keys`: configuration keys mergekit drops (also in the tokenizer
  section and in filter entries), ``residual_weight``, YAML anchor holders, mergekit-moe keys;
- :mod:`~mergekit_ace.checks.structure`: validation as mergekit does it, translated; the merge
  method's name; each slice's inputs;
- :mod:`~mergekit_ace.checks.parameters`: parameters the method ignores, filter entries that
  never apply, values the method refuses, required parameters;
- :mod:`~mergekit_ace.checks.document`: one file, one or several documents;
- :mod:`~mergekit_ace.checks.planned`: what needs the planned merge (filters that match no
  tensor, a ``dtype:`` coarser than the checkpoints);
- :mod:`~mergekit_ace.checks.at_merge`: the warnings a merge logs.
"""

from mergekit_ace.checks.document import Document, check_document, check_source
from mergekit_ace.checks.findings import Finding, nearest
from mergekit_ace.checks.parameters import check_parameters

__all__ = ["Document", "Finding", "check_document", "check_parameters", "check_source", "nearest"]
