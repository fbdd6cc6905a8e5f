"""Every kernel family reads the same way: one registry, one folder template, one contract per op."""
import importlib
import inspect
import os

import pytest
import torch

import mmfast.kernels as K
from mmfast.kernels import _registry

FAMILIES = {f.name: f for f in _registry.FAMILIES}
TEMPLATE = ("_kernels.py", "_configs.py", "_launch.py", "__init__.py")
KERNELS_DIR = os.path.dirname(K.__file__)


def _is_jit(obj):
    # a JITFunction when compiled, an InterpretedFunction under TRITON_INTERPRET=1
    return type(obj).__module__.startswith("triton.")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_folder_has_the_template(name):
    folder = os.path.join(KERNELS_DIR, name)
    missing = [f for f in TEMPLATE if not os.path.isfile(os.path.join(folder, f))]
    assert not missing, f"kernels/{name}/ lacks {missing}"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_kernels_module_holds_only_jit_functions(name):
    module = importlib.import_module(f"mmfast.kernels.{name}._kernels")
    own = {k: v for k, v in vars(module).items() if getattr(v, "__module__", None) == module.__name__ or _is_jit(v)}
    jit = {k for k, v in own.items() if _is_jit(v)}
    assert jit, f"kernels/{name}/_kernels.py defines no @triton.jit function"
    plain = sorted(k for k, v in own.items() if k not in jit and (inspect.isfunction(v) or inspect.isclass(v)))
    assert not plain, f"kernels/{name}/_kernels.py defines non-jit code {plain}: it belongs in _launch.py or _configs.py"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_exports_its_ops_and_specs(name):
    family = FAMILIES[name]
    module = family.kernels
    for op in family.ops:
        assert callable(getattr(module, op, None)), f"mmfast.kernels.{name} does not export {op}"
        assert getattr(K, op) is getattr(module, op), f"mmfast.kernels.{op} is not the family's {op}"
    assert callable(module.compile_specs)


def test_registry_lists_every_public_op():
    public_ops = {name for name in K.__all__ if callable(getattr(K, name)) and not inspect.isclass(getattr(K, name))}
    helpers = {"build_block_mask", "interpreting"}
    assert public_ops - helpers == set(_registry.OPS)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_check_module_takes_a_dtype(name):
    cases = FAMILIES[name].checks.cases
    assert "dtype" in inspect.signature(cases).parameters, f"mmfast.checks.{name}.cases has no dtype parameter"
    rows = list(cases(torch.device("cpu"), dtype=torch.float64))
    assert rows, f"mmfast.checks.{name} yields no float64 case"
    assert {backend for _, backend, *_ in rows} == {"reference"}, "float64 runs on the reference backend only"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_benchmark_suite_is_named_like_the_family(name):
    assert callable(FAMILIES[name].benchmarks.workloads), f"mmfast.benchmarks.{name} has no workloads(mode, device)"


@pytest.mark.parametrize("op", sorted(_registry.OPS))
def test_op_declares_its_autocast_policy(op):
    fn = getattr(K, op)
    if op == "ema_update_":  # an in-place update outside autocast's op lists
        assert not hasattr(fn, "autocast_args")
    else:
        assert getattr(fn, "autocast_args", None), f"{op} is not decorated with _common.autocast_op"


@pytest.mark.parametrize("op", sorted(_registry.OPS))
def test_unknown_backend_lists_every_choice(op):
    from mmfast.kernels._dispatch import resolve_backend

    with pytest.raises(ValueError, match="reference") as info:
        resolve_backend(op, "nope", torch.device("cpu"))
    for backend in _registry.accelerated_backends(op):
        assert repr(backend) in str(info.value)
