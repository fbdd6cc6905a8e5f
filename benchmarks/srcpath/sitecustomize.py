"""Imports mmfast from a source tree without `pip install -e .` (gpu_check.sh's fallback when the install
fails, e.g. a fresh venv whose old setuptools cannot build an editable wheel).

Put this folder and the repository root on PYTHONPATH: Python imports `sitecustomize` at start-up, and
the finder below maps the subpackages that setup.py's package_dir relocates (mmfast.kernels -> kernels/,
mmfast.benchmarks -> benchmarks/, mmfast.csrc -> csrc/); `mmfast` itself is found on the root.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

ROOT = os.environ.get("MMFAST_SOURCE_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
RELOCATED = {"mmfast.kernels": "kernels", "mmfast.benchmarks": "benchmarks", "mmfast.csrc": "csrc"}


class SourceTreeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        for package, folder in RELOCATED.items():
            if name != package and not name.startswith(package + "."):
                continue
            base = os.path.join(ROOT, folder, *name[len(package):].split(".")[1:])
            if os.path.isdir(base):
                init = os.path.join(base, "__init__.py")
                if os.path.isfile(init):
                    return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[base])
                spec = importlib.machinery.ModuleSpec(name, None, is_package=True)  # data folder (csrc)
                spec.submodule_search_locations = [base]
                return spec
            if os.path.isfile(base + ".py"):
                return importlib.util.spec_from_file_location(name, base + ".py")
            return None
        return None


if not any(isinstance(f, SourceTreeFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, SourceTreeFinder())
