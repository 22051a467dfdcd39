"""Start-up hook installed by mergekit-ace through ``mergekit_ace.pth``.

Python runs the ``.pth`` line in every new interpreter, so this module must stay cheap: it
imports nothing beyond the standard library's import machinery and only installs a finder.
When (and only when) one of the mergekit modules below is first imported, the finder lets it
load normally and then hands it to ``mergekit_ace.registration.after_import``: after the
method registry, this package's methods are registered; after the planner and ``run_merge``,
the configuration check and the model-card addition are hooked in; after mergekit-yaml's and
mergekit-multi's scripts, the check of the config file as written.

The package is named here, not imported: it imports this module (to watch modules that are
not loaded yet), and this one must stay importable without it.
"""

import importlib
import sys
from importlib.machinery import PathFinder

TARGETS = (
    "mergekit.merge_methods.registry",
    "mergekit.plan",
    "mergekit.merge",
    "mergekit.scripts.run_yaml",
    "mergekit.scripts.multimerge",
)
AFTER_IMPORT = ("mergekit_ace.registration", "after_import")  # module, function


class _AfterLoad:
    def __init__(self, inner, fullname):
        self._inner = inner
        self._fullname = fullname

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        try:
            module, function = AFTER_IMPORT
            getattr(importlib.import_module(module), function)(self._fullname)
        except Exception as error:  # never break mergekit itself
            import warnings

            warnings.warn(f"mergekit-ace could not hook into {self._fullname}: {error!r}")


class _MergekitFinder:
    def __init__(self, targets):
        self.pending = set(targets)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending:
            sys.meta_path.remove(self)
        spec = PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _AfterLoad(spec.loader, fullname)
        return spec


def install(targets=TARGETS):
    """Watch the ``targets`` not imported yet (idempotent)."""
    finder = next((f for f in sys.meta_path if isinstance(f, _MergekitFinder)), None)
    missing = [name for name in targets if name not in sys.modules]
    if finder is not None:
        finder.pending.update(missing)
    elif missing:
        sys.meta_path.insert(0, _MergekitFinder(missing))


install()
