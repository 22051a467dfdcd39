"""Install the start-up hook (a ``.pth`` file and its tiny module) beside the package.

Both wheel and editable installs get them, so ``mergekit-yaml`` finds ``merge_method: ace``
without any import by the user.
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

HOOK_FILES = {
    "mergekit_ace/_autoload/mergekit_ace.pth": "mergekit_ace.pth",
    "mergekit_ace/_autoload/_mergekit_ace_autoload.py": "_mergekit_ace_autoload.py",
}


class AutoloadHook(BuildHookInterface):
    def initialize(self, version, build_data):
        target = (
            "force_include_editable"
            if self.target_name == "wheel" and version == "editable"
            else "force_include"
        )
        build_data.setdefault(target, {}).update(HOOK_FILES)
