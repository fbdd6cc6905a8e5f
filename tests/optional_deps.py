"""The optional packages the parity tests compare against (transformers, timm, open_clip, hypothesis): a test
that needs one is skipped, naming it and why it did not import; the other tests of its file still run. A
module-level `import open_clip` would instead stop the whole session at collection (the GPU image of
2026-11-28 has no open_clip). tests/test_optional_deps.py collects the suite with them blocked."""
import importlib

import pytest

_FAILED = {}  # module name -> the ImportError, so the skip reason says why


def optional_import(name):
    """The module `name` (dotted names too), or None when it cannot be imported: not installed, broken,
    or blocked with sys.modules[name] = None."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        _FAILED[name] = exc
        return None


def requires(*names):
    """A skipif mark: the test runs only when every module in `names` imports."""
    missing = [name for name in names if optional_import(name) is None]
    why = "; ".join(f"{name}: {_FAILED[name]}" for name in missing)
    return pytest.mark.skipif(bool(missing), reason=f"needs {' and '.join(missing)} (optional; pip install -e .[dev]), "
                                                   f"which does not import here: {why}")
