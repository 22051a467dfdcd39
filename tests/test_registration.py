"""Installing the package is enough: new processes find ``ace`` without importing us, start-up
stays light, registration is idempotent and tolerates a mergekit that ships its own ``ace``."""

import subprocess
import sys
import textwrap


def run_python(code: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_fresh_process_finds_ace_without_importing_mergekit_ace():
    out = run_python(
        """
        import sys
        assert "mergekit_ace" not in sys.modules
        from mergekit.merge_methods import registry
        method = registry.get("ace")
        print(type(method).__module__, method.spec.pretty_name, method.spec.reference_url)
        """
    ).stdout
    assert "mergekit_ace.methods.common ACE-Merging https://arxiv.org/abs/2603.02945" in out


def test_interpreter_start_imports_nothing_heavy():
    out = run_python(
        """
        import sys
        roots = ("torch", "mergekit", "mergekit_ace", "transformers")
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in roots)
        hooks = [type(f).__name__ for f in sys.meta_path
                 if type(f).__module__ == "_mergekit_ace_autoload"]
        print(heavy, hooks)
        """
    ).stdout
    assert out.strip() == "[] ['_MergekitFinder']"


def test_import_registers_idempotently():
    out = run_python(
        """
        import mergekit_ace, importlib
        from mergekit.merge_methods import registry
        first = registry.get("ace")
        importlib.reload(mergekit_ace)
        a, b = mergekit_ace.register_all(), mergekit_ace.register_all()
        print("ace" in a, a == b, registry.get("ace") is first,
              sum(1 for m in registry.registered_methods() if m.spec.name == "ace"))
        """
    ).stdout
    assert out.strip() == "True True True 1"


def test_mergekit_own_ace_is_kept_without_crashing():
    out = run_python(
        """
        import logging
        logging.basicConfig(level=logging.WARNING)
        from mergekit.merge_methods import registry
        from mergekit.merge_methods.linear import linear_merge
        from dataclasses import replace
        import mergekit_ace.methods as methods
        from mergekit_ace import compat

        # a mergekit that ships its own `ace`: its registry already holds the name
        assert compat.unregister_method("ace") is not None
        methods._OURS.clear()
        spec = replace(linear_merge.spec, name="ace")
        theirs = type(linear_merge)(spec, linear_merge.implementation)
        registry.register(theirs)
        import mergekit_ace
        print("ace" in mergekit_ace.register_all(), registry.get("ace") is theirs)
        """
    )
    assert out.stdout.strip() == "False True"
    assert "already provides a merge method named 'ace'" in out.stderr
