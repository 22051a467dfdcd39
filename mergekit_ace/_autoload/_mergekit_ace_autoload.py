"""Start-up hook installed by mergekit-ace through ``mergekit_ace.pth``.

Python runs the ``.pth`` line in every new interpreter, so this module must stay cheap: it
imports nothing beyond the standard library's import machinery and only installs a finder.
When (and only when) ``mergekit.merge_methods.registry`` is first imported, the finder lets
it load normally and then imports ``mergekit_ace``, which registers this package's methods.
"""

import sys
from importlib.machinery import PathFinder

_TARGET = "mergekit.merge_methods.registry"


class _RegisterAfterLoad:
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        try:
            import mergekit_ace.registration as registration

            registration.register_all()
        except Exception as error:  # never break mergekit itself
            import warnings

            warnings.warn(f"mergekit-ace could not register its merge methods: {error!r}")


class _RegistryFinder:
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install():
    if _TARGET in sys.modules:
        return
    if not any(isinstance(finder, _RegistryFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())


install()
