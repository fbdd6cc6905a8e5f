"""GPU-readiness gate: compile every kernel ahead of time for sm_80 / sm_90 and check its resources.

Runs without a GPU. For each Triton spec of ``mmfast.kernels._registry.all_compile_specs()`` and each
target it calls ``triton.compile`` (target ``GPUTarget("cuda", cc, 32)``), then reads

* registers, local memory and stack from ``cuobjdump --dump-resource-usage`` on the cubin,
* spill stores / loads from ``ptxas -v`` on the kernel's PTX (the same ptxas Triton uses),
* shared memory from ``compiled.metadata.shared`` (Triton allocates it dynamically),
* the tensor-core instructions (``wgmma`` / ``mma.sync`` / none) and TMA loads from the PTX,
* occupancy: the CTAs and warps per SM that those registers and that shared memory allow (``SM_LIMITS``),
* the tile's arithmetic intensity, FLOPs per byte of global loads in one main-loop step, from the spec's
  declared dots and loads (``CompileSpec.step_dots`` / ``step_loads``),

and for each ``csrc/*.cu`` (when nvcc is found) compiles it with ``nvcc -c -Xptxas -v`` for the same
targets and parses registers / spills / static shared memory per kernel.

A row FAILs on a compile error, on local memory or spills (a stack frame counts only when ptxas
reports spills), on shared memory above the target's opt-in limit, or, on sm_90, when a spec marked
``needs_wgmma`` (a 16-bit ``tl.dot`` config the launchers choose for aligned inputs there) has any dot
that does not lower to ``wgmma``. A spec with ``targets`` is compiled for those compute capabilities only.
CUDA sources are "skipped" (not failed) when nvcc is missing.

CLI: ``python -m mmfast compile-report [--arch 80,90] [--no-nvcc] [--json PATH] [--cu FILE ...]
[--specs MODULE:FUNC ...] [--filter TEXT ...] [--plain] [--triton VERSION]``
(also ``python -m mmfast.compile_report``); the exit code is 1 when any row fails.

``--triton VERSION`` runs the same report with another Triton: in a virtual environment kept under
``$MMFAST_CACHE_DIR`` (default ``~/.cache/mmfast``) that sees this environment's packages (torch, mmfast,
an editable install's mapping included) and has only ``triton==VERSION`` installed on top (and
``numpy<2.3`` for 3.6), from the configured package index; its folder is keyed by the environment it
layers over (python, torch, import path, mmfast's source) and the Triton release. Register
allocation differs between Triton releases (their ptxas and their passes): a config that fits on one
can spill on another, and users run 3.6 (torch 2.11) through 3.9, so CI runs the gate on both ends.

TRITON_INTERPRET=1 turns ``@triton.jit`` functions into interpreter objects that cannot be compiled,
so ``main`` re-runs itself in a subprocess without it. Progress goes to stderr (a rich bar on a terminal,
one line per row otherwise); the table to stdout.
"""
import argparse
import contextlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

# Opt-in (maximum dynamic) shared memory per block, in bytes, by compute capability.
SHARED_LIMITS = {
    70: 98304,  # 96 KiB
    75: 65536,  # 64 KiB
    80: 166912,  # 163 KiB
    86: 101376,  # 99 KiB
    87: 166912,
    89: 101376,
    90: 232448,  # 227 KiB
    100: 232448,
    103: 232448,
    120: 101376,
}

# What bounds the CTAs resident on one SM, by compute capability (CUDA occupancy calculator, sm_80 / sm_90):
# 64 K registers allocated per warp in units of 256, shared memory per SM with 1 KiB reserved per CTA,
# at most 64 warps and 32 CTAs.
SM_LIMITS = {
    80: {"registers": 65536, "shared": 167936, "warps": 64, "ctas": 32},
    90: {"registers": 65536, "shared": 233472, "warps": 64, "ctas": 32},
}
CTA_RESERVED_SHARED = 1024
REGISTER_UNIT = 256  # registers per warp are allocated in units of this many

_COUNTER = itertools.count()
_REEXEC_GUARD = "MMFAST_COMPILE_REPORT_REEXEC"


@dataclass
class Row:
    kernel: str
    config: str
    target: str  # "sm_80"
    source: str = "triton"  # "triton" | "nvcc"
    status: str = "ok"  # "ok" | "FAIL" | "skipped"
    registers: int = None
    shared: int = None  # bytes (Triton: dynamic; nvcc: static)
    shared_limit: int = None
    local: int = None  # bytes of local memory per thread (cuobjdump LOCAL)
    stack: int = None  # bytes of stack frame per thread
    spill_stores: int = None  # bytes (ptxas -v)
    spill_loads: int = None
    warps: int = None  # per CTA
    mma: str = None  # tensor-core instructions in the PTX: "wgmma", "mma.sync", both joined by "+", or "none"
    tma: bool = None  # whether the kernel loads through the Tensor Memory Accelerator (cp.async.bulk.tensor)
    ctas_per_sm: int = None  # resident CTAs per SM that registers and shared memory allow
    warps_per_sm: int = None
    occupancy_limit: str = ""  # what bounds ctas_per_sm: "registers", "shared", "warps" or "ctas"
    intensity: float = None  # FLOPs per byte of global loads in one main-loop step (CompileSpec.intensity)
    needs_wgmma: bool = False  # CompileSpec.needs_wgmma: on sm_90 the row fails unless mma == "wgmma"
    reason: str = ""
    seconds: float = 0.0

    @property
    def failed(self):
        return self.status == "FAIL"


def _sm(cc):
    return f"sm_{cc}"


# ----------------------------------------------------------------------------------------------
# Tools


def _triton_tool(name):
    """Path of a CUDA tool bundled with (or configured for) Triton: 'cuobjdump', 'ptxas'."""
    try:
        from triton import knobs

        return getattr(knobs.nvidia, name).path
    except Exception:  # older/newer Triton without knobs: use the bundled binary
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.isfile(path):
            return path
        return shutil.which(name)


def _ptxas_for(cc):
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            tool = get_ptxas(cc)
        except TypeError:  # Triton versions where get_ptxas takes no argument
            tool = get_ptxas()
        return getattr(tool, "path", tool)
    except Exception:
        return _triton_tool("ptxas-blackwell" if cc >= 100 else "ptxas")


def find_nvcc():
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which("nvcc")


# ----------------------------------------------------------------------------------------------
# Parsers

_RESOURCE_FN = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_RESOURCE_KV = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")
_ARCH_HEADER = re.compile(r"arch\s*=\s*(sm_\d+a?)")


def parse_resource_usage(text):
    """cuobjdump --dump-resource-usage -> {(arch or None, function): {"REG": .., "STACK": .., ...}}."""
    out = {}
    arch = None
    function = None
    for line in text.splitlines():
        m = _ARCH_HEADER.search(line)
        if m and "Function" not in line:
            arch = m.group(1)
            continue
        m = _RESOURCE_FN.match(line)
        if m:
            function = m.group(1)
            continue
        if function is not None and "REG:" in line:
            out[(arch, function)] = {k: int(v) for k, v in _RESOURCE_KV.findall(line)}
            function = None
    return out


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PTXAS_PROPS = re.compile(r"Function properties for (\S+)")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(text):
    """ptxas -v output -> {(arch, entry): {"registers", "shared", "stack", "spill_stores", "spill_loads"}}.

    Spills of non-inlined device functions are added to the entry being compiled.
    """
    out = {}
    current = None
    props_for = None
    for line in text.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current = (m.group(2), m.group(1))
            out.setdefault(current, {"registers": None, "shared": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0})
            props_for = None
            continue
        m = _PTXAS_PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = _PTXAS_FRAME.search(line)
        if m and current is not None:
            stack, stores, loads = (int(g) for g in m.groups())
            entry = out[current]
            if props_for == current[1]:
                entry["stack"] = stack
            entry["spill_stores"] += stores
            entry["spill_loads"] += loads
            continue
        m = _PTXAS_USED.search(line)
        if m and current is not None:
            out[current]["registers"] = int(m.group(1))
            s = _PTXAS_SMEM.search(line)
            out[current]["shared"] = int(s.group(1)) if s else 0
    return out


def _demangle(names):
    names = list(names)
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    try:
        res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, timeout=30)
        plain = res.stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {n: n for n in names}
    if len(plain) != len(names):
        return {n: n for n in names}
    return {n: _short_name(p) for n, p in zip(names, plain)}


def _short_name(signature):
    """'void ns::kern<float, c10::BFloat16>(long const*, ...)' -> 'ns::kern<float, c10::BFloat16>'."""
    signature = signature.replace("(anonymous namespace)::", "")
    depth = 0
    for i, ch in enumerate(signature):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and i > 0:
            signature = signature[:i]
            break
    if signature.startswith("void "):
        signature = signature[5:]
    return signature


_MMA_PATTERNS = (("wgmma", re.compile(r"^\s*wgmma\.mma_async", re.M)), ("mma.sync", re.compile(r"^\s*mma\.sync", re.M)))
_TMA_PATTERN = re.compile(r"^\s*cp\.async\.bulk\.tensor", re.M)


def mma_family(ptx):
    """The tensor-core instructions in a PTX text: "wgmma", "mma.sync", "wgmma+mma.sync" or "none"."""
    found = [name for name, pattern in _MMA_PATTERNS if pattern.search(ptx)]
    return "+".join(found) or "none"


def uses_tma(ptx):
    return bool(_TMA_PATTERN.search(ptx))


def occupancy(cc, registers, shared, warps):
    """(CTAs per SM, warps per SM, the binding limit) for a kernel of `registers` per thread, `shared` bytes
    of shared memory and `warps` warps per CTA on compute capability `cc` (None if `cc` is not tabled)."""
    limits = SM_LIMITS.get(cc)
    if limits is None or registers is None or warps is None:
        return None, None, ""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    bounds = {
        "registers": (limits["registers"] // per_warp) // warps if per_warp else limits["ctas"],
        "shared": limits["shared"] // ((shared or 0) + CTA_RESERVED_SHARED),
        "warps": limits["warps"] // warps,
        "ctas": limits["ctas"],
    }
    limit = min(bounds, key=bounds.get)
    ctas = bounds[limit]
    return ctas, ctas * warps, limit


# ----------------------------------------------------------------------------------------------
# Checks


def _judge(row):
    """Set row.status / row.reason from its resources (compile errors are set by the caller)."""
    problems = []
    spills = (row.spill_stores or 0) + (row.spill_loads or 0)
    if row.local:
        problems.append(f"{row.local} B local memory")
    if spills:
        problems.append(f"spills: {row.spill_stores} B stores / {row.spill_loads} B loads")
        if row.stack:
            problems.append(f"{row.stack} B stack frame")
    if row.shared is not None and row.shared_limit is not None and row.shared > row.shared_limit:
        problems.append(f"shared memory {row.shared} B > {row.shared_limit} B limit of {row.target}")
    if row.needs_wgmma and row.target == "sm_90" and row.mma is not None and row.mma != "wgmma":
        problems.append(f"16-bit dots lower to {row.mma}, not wgmma, on sm_90")
    notes = []
    if row.stack and not spills:
        notes.append(f"{row.stack} B stack frame (no spills)")
    if problems:
        row.status = "FAIL"
        row.reason = "; ".join(problems + notes)
    else:
        row.status = "ok"
        row.reason = "; ".join(notes)
    return row


def _error_summary(exc):
    """One line: Triton's "at 2:4:" header, the offending source line (above the caret), the message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "^" in lines:
        caret = lines.index("^")
        lines = lines[:1] + lines[caret - 1 : caret] + lines[caret + 1 :]
    else:
        lines = lines[:1] + lines[-1:]
    return " ".join(dict.fromkeys(lines))


def _spec_options(spec):
    return {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **(spec.options or {})}


def check_spec(spec, cc, workdir=None):
    """Compile one CompileSpec for compute capability ``cc`` and return its Row."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = Row(kernel=spec.name, config=spec.label or "", target=_sm(cc), shared_limit=SHARED_LIMITS.get(cc),
              warps=spec.num_warps, needs_wgmma=bool(getattr(spec, "needs_wgmma", False)))
    intensity = getattr(spec, "intensity", None)
    row.intensity = None if intensity is None else round(intensity, 1)
    start = time.perf_counter()
    try:
        if not hasattr(spec.kernel, "arg_names") or type(spec.kernel).__name__ == "InterpretedFunction":
            raise RuntimeError(
                f"{spec.name} is a {type(spec.kernel).__name__}, not a @triton.jit JITFunction "
                "(was it imported with TRITON_INTERPRET=1?)"
            )
        attrs = {(spec.kernel.arg_names.index(name),): [["tt.divisibility", value]]
                 for name, value in getattr(spec, "divisibility", {}).items()}
        src = triton.compiler.ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs,
                                        attrs=attrs or None)
        # Triton prints ptxas failures (with the whole PTX) to stdout: keep them out of the table
        with contextlib.redirect_stdout(io.StringIO()):
            compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=_spec_options(spec))
    except Exception as exc:  # compile error: the row fails, the report goes on
        row.status = "FAIL"
        row.reason = f"compile error: {type(exc).__name__}: {_error_summary(exc)}"[:300]
        row.seconds = time.perf_counter() - start
        return row

    row.shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    own_dir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="mmfast-compile-report-")
    try:
        base = os.path.join(workdir, f"{spec.name}-{next(_COUNTER)}-{cc}")
        cubin_path = base + ".cubin"
        with open(cubin_path, "wb") as f:
            f.write(compiled.asm["cubin"])
        name = getattr(compiled.metadata, "name", spec.name)
        notes = []
        # registers / local / stack from the cubin itself
        try:
            res = subprocess.run(
                [_triton_tool("cuobjdump"), "--dump-resource-usage", cubin_path],
                capture_output=True, text=True, timeout=120,
            )
            usage = parse_resource_usage(res.stdout)
            entry = next((v for (a, fn), v in usage.items() if fn == name), None)
            if entry is None and usage:
                entry = next(iter(usage.values()))
            if entry is not None:
                row.registers = entry.get("REG")
                row.local = entry.get("LOCAL", 0)
                row.stack = entry.get("STACK", 0)
            else:
                notes.append(f"cuobjdump gave no resource usage: {res.stderr.strip()[:200]}")
        except (OSError, subprocess.SubprocessError, TypeError) as exc:
            notes.append(f"cuobjdump unavailable: {exc}")
        # spill stores / loads: ptxas -v on the same PTX
        ptx = compiled.asm.get("ptx") if hasattr(compiled.asm, "get") else compiled.asm["ptx"]
        if ptx:
            text = ptx if isinstance(ptx, str) else ptx.decode()
            row.mma, row.tma = mma_family(text), uses_tma(text)
            ptx_path = base + ".ptx"
            with open(ptx_path, "w") as f:
                f.write(ptx if isinstance(ptx, str) else ptx.decode())
            m = re.search(r"^\s*\.target\s+(sm_\d+a?)", ptx if isinstance(ptx, str) else ptx.decode(), re.M)
            arch = m.group(1) if m else _sm(cc)
            cmd = [_ptxas_for(cc), "-v", f"--gpu-name={arch}", ptx_path, "-o", base + ".ptxas.cubin"]
            if not _spec_options(spec).get("enable_fp_fusion", True):
                cmd.insert(1, "--fmad=false")
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                info = parse_ptxas_log(res.stdout + res.stderr)
                entry = next((v for (a, fn), v in info.items() if fn == name), None)
                if entry is not None:
                    row.spill_stores = entry["spill_stores"]
                    row.spill_loads = entry["spill_loads"]
                    if row.registers is None:
                        row.registers = entry["registers"]
                    if row.stack is None:
                        row.stack = entry["stack"]
                else:
                    notes.append("ptxas -v gave no spill info")
            except (OSError, subprocess.SubprocessError, TypeError) as exc:
                notes.append(f"ptxas unavailable: {exc}")
        row.ctas_per_sm, row.warps_per_sm, row.occupancy_limit = occupancy(cc, row.registers, row.shared, row.warps)
        _judge(row)
        if notes:
            row.reason = "; ".join(([row.reason] if row.reason else []) + notes)
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    row.seconds = time.perf_counter() - start
    return row


def _csrc_dir():
    try:
        from mmfast._ext import csrc_dir

        return csrc_dir()
    except (ImportError, AttributeError, FileNotFoundError):
        here = os.path.dirname(os.path.abspath(__file__))
        for candidate in (os.path.join(os.path.dirname(here), "csrc"), os.path.join(here, "csrc")):
            if os.path.isdir(candidate):
                return candidate
    return None


def cuda_sources():
    src = _csrc_dir()
    if src is None:
        return []
    return [os.path.join(src, f) for f in sorted(os.listdir(src)) if f.endswith(".cu")]


def _cpp_extension():
    """torch.utils.cpp_extension without its "No CUDA runtime is found" warning (None without torch)."""
    try:
        from mmfast._ext import cpp_extension

        return cpp_extension()
    except ImportError:
        return None


def _torch_include_paths():
    include_paths = getattr(_cpp_extension(), "include_paths", None)
    if include_paths is None:
        return []
    for kwargs in ({"device_type": "cuda"}, {"cuda": True}, {}):  # torch >= 2.6 | older torch | CPU only
        try:
            return list(include_paths(**kwargs))
        except TypeError:
            continue
        except Exception:  # e.g. OSError: CUDA_HOME unknown to torch; nvcc still finds its own headers
            try:
                return list(include_paths())
            except Exception:
                return []
    return []


def _cuda_include_dirs(nvcc):
    """CUDA headers: nvcc adds its own include/; add pip's nvidia/*/include only if that lacks them."""
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    for d in (os.path.join(home, "include"), "/usr/local/cuda/include"):
        if os.path.isfile(os.path.join(d, "cuda_runtime.h")):
            return []
    dirs = []
    try:
        import nvidia

        for root in list(nvidia.__path__):
            for sub in sorted(os.listdir(root)):
                inc = os.path.join(root, sub, "include")
                if os.path.isfile(os.path.join(inc, "cuda_runtime.h")):
                    dirs.append(inc)
    except ImportError:
        pass
    return dirs


def nvcc_command(nvcc, source, targets, output):
    # the flags torch's extension builder passes to nvcc (no implicit half/bf16 conversions, ...)
    COMMON_NVCC_FLAGS = getattr(_cpp_extension(), "COMMON_NVCC_FLAGS", [])
    cmd = [nvcc, "-c", source, "-o", output, "-DMMFAST_WITH_CUDA", "-std=c++17", "-O3", "-Xptxas", "-v"]
    cmd += list(COMMON_NVCC_FLAGS) + ["-Xcompiler", "-fPIC"]
    for cc in targets:
        cmd += ["-gencode", f"arch=compute_{cc},code=sm_{cc}"]
    csrc = os.path.dirname(os.path.abspath(source))
    includes = _torch_include_paths() + [sysconfig.get_paths()["include"], csrc] + _cuda_include_dirs(nvcc)
    for inc in includes:
        cmd += ["-I", inc]
    return cmd


def check_cuda_source(source, targets, nvcc=None, workdir=None):
    """Compile one .cu with nvcc for all targets (one invocation); rows per (kernel, target)."""
    nvcc = nvcc or find_nvcc()
    base = os.path.basename(source)
    if nvcc is None:
        return [Row(kernel=base, config="nvcc", target=_sm(cc), source="nvcc", status="skipped", reason="nvcc not found")
                for cc in targets]
    own_dir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="mmfast-compile-report-")
    start = time.perf_counter()
    try:
        obj = os.path.join(workdir, base + ".o")
        try:
            res = subprocess.run(nvcc_command(nvcc, source, targets, obj), capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.SubprocessError) as exc:
            return [Row(kernel=base, config="nvcc", target=_sm(cc), source="nvcc", status="FAIL",
                        reason=f"nvcc could not run: {exc}") for cc in targets]
        seconds = time.perf_counter() - start
        log = res.stdout + res.stderr
        if res.returncode != 0:
            errors = [line for line in log.splitlines() if "error" in line.lower()] or log.strip().splitlines()[-3:]
            return [Row(kernel=base, config="nvcc", target=_sm(cc), source="nvcc", status="FAIL",
                        reason=("compile error: " + " | ".join(errors[:3]))[:400], seconds=seconds) for cc in targets]
        info = parse_ptxas_log(log)
        usage = {}
        try:
            dump = subprocess.run([_triton_tool("cuobjdump"), "--dump-resource-usage", obj],
                                  capture_output=True, text=True, timeout=120)
            usage = parse_resource_usage(dump.stdout)
        except (OSError, subprocess.SubprocessError, TypeError):
            pass
        names = _demangle(sorted({fn for _, fn in info}))
        rows = []
        for cc in targets:
            kernels = sorted(fn for arch, fn in info if arch.rstrip("a") == _sm(cc))
            if not kernels:
                rows.append(Row(kernel=base, config="nvcc", target=_sm(cc), source="nvcc", status="ok",
                                reason="no __global__ kernels", seconds=seconds))
                continue
            for fn in kernels:
                entry = info[(_sm(cc), fn)] if (_sm(cc), fn) in info else info[(_sm(cc) + "a", fn)]
                row = Row(kernel=f"{base}:{names.get(fn, fn)}", config="nvcc", target=_sm(cc), source="nvcc",
                          registers=entry["registers"], shared=entry["shared"], shared_limit=SHARED_LIMITS.get(cc),
                          stack=entry["stack"], spill_stores=entry["spill_stores"], spill_loads=entry["spill_loads"],
                          seconds=seconds)
                res_entry = usage.get((_sm(cc), fn))
                row.local = res_entry.get("LOCAL", 0) if res_entry else 0
                rows.append(_judge(row))
        return rows
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)


def _compiled_for(spec, cc):
    """Whether the launchers may choose `spec` on compute capability `cc` (CompileSpec.targets)."""
    return not getattr(spec, "targets", ()) or int(cc) in spec.targets


def _triton_specs():
    from mmfast.kernels._registry import all_compile_specs

    return list(all_compile_specs())


def load_specs(ref):
    """Specs from 'package.module:function' or 'path/to/file.py:function' (the function returns specs)."""
    import importlib
    import importlib.util

    module_ref, _, func = ref.rpartition(":")
    if not module_ref or not func:
        raise ValueError(f"--specs expects MODULE:FUNCTION or FILE.py:FUNCTION, got {ref!r}")
    if module_ref.endswith(".py") or os.sep in module_ref:
        name = "_mmfast_specs_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(module_ref))[0])
        spec = importlib.util.spec_from_file_location(name, module_ref)
        if spec is None:
            raise ValueError(f"cannot import {module_ref}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_ref)
    return list(getattr(module, func)())


def run(targets=(80, 90), include_cuda_sources=True, specs=None, cu_files=None, progress=None, on_start=None):
    """Check every Triton spec (``specs``, default all_compile_specs()) and CUDA source for each target.

    nvcc runs in a background thread (one file at a time) while Triton compiles in this thread; Triton
    compiles run one at a time (triton.compile is not documented as thread-safe and CI has 2 cores).
    ``on_start(spec, cc)`` is called before each Triton compile and ``progress(row)`` after each row
    (nvcc rows from the background thread, once per file).
    """
    # the one rule (mmfast.kernels._common); importing it imports mmfast.kernels, whose kernels become
    # interpreter objects under TRITON_INTERPRET=1: this process then refuses
    from mmfast.kernels._common import interpreting

    if interpreting():
        raise RuntimeError(
            "compile_report needs real @triton.jit kernels but TRITON_INTERPRET is set; "
            "run `python -m mmfast compile-report` (it re-executes itself without TRITON_INTERPRET) "
            "or unset TRITON_INTERPRET"
        )
    targets = tuple(int(cc) for cc in targets)
    specs = _triton_specs() if specs is None else list(specs)
    with tempfile.TemporaryDirectory(prefix="mmfast-compile-report-") as workdir:
        cuda_rows = []
        worker = None
        if include_cuda_sources:
            files = cuda_sources() if cu_files is None else list(cu_files)
            nvcc = find_nvcc()

            def _nvcc_all():
                for path in files:
                    rows = check_cuda_source(path, targets, nvcc=nvcc, workdir=workdir)
                    cuda_rows.extend(rows)
                    if progress:
                        for row in rows:
                            progress(row)

            worker = threading.Thread(target=_nvcc_all, name="mmfast-nvcc", daemon=True)
            worker.start()
        rows = []
        for spec in specs:
            for cc in targets:
                if not _compiled_for(spec, cc):
                    continue
                if on_start:
                    on_start(spec, cc)
                row = check_spec(spec, cc, workdir=workdir)
                rows.append(row)
                if progress:
                    progress(row)
        if worker is not None:
            worker.join()
            rows.extend(cuda_rows)
    return rows


class Progress:
    """Progress on stderr while the report compiles: a rich bar naming the kernel, config and target being
    compiled when stderr is a terminal and rich is installed, else one plain line per finished row (CI
    logs). The table itself goes to stdout."""

    def __init__(self, total, plain=False, file=None):
        self.total, self.done, self.file = total, 0, file or sys.stderr
        self._lock = threading.Lock()
        self._bar = None
        if not plain and getattr(self.file, "isatty", lambda: False)():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

                self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=Console(file=self.file), transient=True)
                self._task = self._bar.add_task("compiling", total=total)
            except ImportError:
                self._bar = None

    def __enter__(self):
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()

    def start(self, spec, cc):
        if self._bar is not None:
            label = f" {spec.label}" if spec.label else ""
            self._bar.update(self._task, description=f"{spec.name}{label} for {_sm(cc)}")

    def __call__(self, row):
        with self._lock:
            if row.source == "triton":
                self.done += 1
            if self._bar is not None:
                if row.source == "triton":
                    self._bar.advance(self._task)
                if row.failed:
                    self._bar.console.print(f"FAIL {row.kernel} {row.config} {row.target}: {row.reason}")
                return
            count = f"[{self.done:>{len(str(self.total))}}/{self.total}]" if row.source == "triton" else "[nvcc]"
            regs = "" if row.registers is None else f", {row.registers} registers"
            print(f"{count} {row.target} {row.kernel} {row.config}: {row.status}{regs}, {row.seconds:.1f} s"
                  + (f" ({row.reason})" if row.failed else ""), file=self.file, flush=True)


# ----------------------------------------------------------------------------------------------
# Output


def _cells(row):
    # local memory per thread: LOCAL plus the ABI stack frame (where ptxas puts spills)
    spills = "" if row.local is None and row.stack is None else str((row.local or 0) + (row.stack or 0))
    if row.spill_stores or row.spill_loads:
        spills += f" (st {row.spill_stores}/ld {row.spill_loads})"
    status = row.status + (f": {row.reason}" if row.reason else "")
    occupancy = "" if row.ctas_per_sm is None else f"{row.ctas_per_sm} / {row.warps_per_sm} ({row.occupancy_limit})"
    return [
        row.kernel,
        row.config,
        row.target,
        "" if row.registers is None else str(row.registers),
        "" if row.shared is None else str(row.shared),
        spills,
        row.mma or "",
        "" if row.tma is None else ("yes" if row.tma else "no"),
        occupancy,
        "" if row.intensity is None else f"{row.intensity:.0f}",
        status,
    ]


HEADERS = ["kernel", "config", "target", "registers", "shared (B)", "spills (local B)", "mma", "tma",
           "CTAs / warps per SM", "FLOP/B", "status"]
_NUMERIC = ("registers", "shared (B)", "spills (local B)", "CTAs / warps per SM", "FLOP/B")


def format_table(rows):
    """Plain aligned text."""
    table = [HEADERS] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
    lines = []
    for n, line in enumerate(table):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(rows, title, file=None, plain=False):
    file = file or sys.stdout
    try:
        if plain:
            raise ImportError
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title, file=file)
        print(format_table(rows), file=file)
        return
    table = Table(title=title, title_justify="left")
    for h in HEADERS:
        table.add_column(h, justify="right" if h in _NUMERIC else "left",
                         overflow="fold")
    for row in rows:
        style = {"FAIL": "bold red", "skipped": "yellow"}.get(row.status)
        table.add_row(*_cells(row), style=style)
    width = None if file.isatty() else 400  # captured output: one line per row (no wrap at 80 columns)
    Console(file=file, width=width, soft_wrap=False).print(table)


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mmfast compile-report", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default: 80,90)")
    p.add_argument("--no-nvcc", action="store_true", help="skip the CUDA C++ sources (csrc/*.cu)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH ('-' for stdout)")
    p.add_argument("--cu", metavar="FILE", action="append",
                   help="check this .cu file instead of csrc/*.cu (repeatable)")
    p.add_argument("--specs", metavar="MODULE:FUNC", action="append",
                   help="check the specs returned by MODULE:FUNC (or FILE.py:FUNC) instead of all_compile_specs() "
                   "(repeatable)")
    p.add_argument("--filter", metavar="TEXT", action="append",
                   help="only the specs whose kernel name or config contains TEXT (repeatable: any of them)")
    p.add_argument("--plain", action="store_true", help="plain text table even if rich is installed")
    p.add_argument("--triton", metavar="VERSION",
                   help="run the report with this Triton release, in a cached virtual environment (see above)")
    return p.parse_args(argv)


def _strip_triton_flag(argv):
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--triton":
            skip = True
        elif not a.startswith("--triton="):
            out.append(a)
    return out


# Triton 3.6's interpreter converts numpy arrays in a way numpy >= 2.3 refuses ("only 0-dimensional arrays
# can be converted to Python scalars"): its environment gets an older numpy as well.
TRITON_EXTRA_PINS = {"3.6": ["numpy<2.3"]}
_PACKAGES = ("mmfast", "mmfast.kernels", "mmfast.csrc", "mmfast.benchmarks")


def _source_dirs():
    """Where this environment imports mmfast's packages from (without importing mmfast.kernels)."""
    import importlib.util

    dirs = {}
    for name in _PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            dirs[name] = os.path.realpath(list(spec.submodule_search_locations)[0])
    return dirs


def _parent_paths():
    """This environment's import path, without the standard library (the child has its own) and without
    the script's folder or working directory that python puts first."""
    stdlib = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
    out = []
    for entry in sys.path[0 if getattr(sys.flags, "safe_path", False) else 1:]:
        real = os.path.realpath(entry) if entry else ""
        if not entry or not os.path.isdir(real) or real in stdlib or real.endswith("lib-dynload"):
            continue
        if real not in out:
            out.append(real)
    return out


def _extra_pins(version):
    return next((pins for prefix, pins in TRITON_EXTRA_PINS.items() if version.startswith(prefix + ".")), [])


def triton_env_key(version):
    """What a cached environment depends on: the environment it layers over (its python, prefix and
    import path, torch), where mmfast comes from, and the Triton release with its pins."""
    import hashlib
    import importlib.metadata

    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "none"
    parts = [os.path.realpath(sys.executable), sys.prefix, sys.version, f"torch {torch_version}",
             f"triton {version}", *_extra_pins(version), *(f"{k}={v}" for k, v in sorted(_source_dirs().items())),
             *_parent_paths()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _layer_files(site_packages):
    """Make a child environment see this one: its import path (a .pth that adds each entry, running the
    .pth files there, e.g. an editable install's finder), and mmfast's packages where this environment
    finds them (a finder first on sys.meta_path: an editable install's mapping of kernels/ to mmfast.kernels
    does not carry over to a venv layered over a venv)."""
    lines = ["import site, sys"]
    for path in _parent_paths():
        if os.path.basename(path) in ("site-packages", "dist-packages"):
            lines.append(f"site.addsitedir({path!r})")
        else:
            lines.append(f"{path!r} in sys.path or sys.path.append({path!r})")
    with open(os.path.join(site_packages, "_mmfast_layer.pth"), "w") as f:
        # a .pth runs lines that start with "import"; one line so that the statements run in order
        f.write("import _mmfast_layer\n")
    with open(os.path.join(site_packages, "_mmfast_layer.py"), "w") as f:
        f.write("\n".join(lines) + "\n" + f"""
import importlib.util

_DIRS = {_source_dirs()!r}


class _MmfastSourceFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        folder = _DIRS.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, folder + "/__init__.py",
                                                      submodule_search_locations=[folder])


sys.meta_path.insert(0, _MmfastSourceFinder)
""")


def layered_env(path, packages=()):
    """Create a virtual environment at `path` over this one (see :func:`_layer_files`) with `packages`
    installed on top (``pip install --no-deps`` by this environment's pip); returns its python."""
    import venv

    venv.EnvBuilder(system_site_packages=False, with_pip=False, clear=True).create(path)
    python = os.path.join(path, "bin", "python")
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    if packages:
        # no pip of its own: this environment's pip installs into it
        res = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                              *packages], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"could not install {' '.join(packages)}: {(res.stderr or res.stdout).strip()[-500:]}")
    _layer_files(site_packages)
    return python


def triton_env(version):
    """The python of a virtual environment with ``triton==version`` (and its pins) over this environment's
    packages, cached under ``$MMFAST_CACHE_DIR`` (default ``~/.cache/mmfast``) in a folder keyed by
    :func:`triton_env_key`. Created on first use; an unfinished one is never used: it is built in a
    temporary folder and renamed."""
    root = os.environ.get("MMFAST_CACHE_DIR") or os.path.expanduser("~/.cache/mmfast")
    final = os.path.join(root, f"triton-{version}-{triton_env_key(version)}")
    python = os.path.join(final, "bin", "python")
    if os.path.exists(python):
        return python
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"triton-{version}-", dir=root)
    try:
        layered_env(tmp, [f"triton=={version}", *_extra_pins(version)])
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: use its environment
            pass
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return python


def _rerun(argv, python=sys.executable):
    """This report in a child process without TRITON_INTERPRET (with another Python: another Triton)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[_REEXEC_GUARD] = "1"
    return subprocess.call([python, "-m", "mmfast.compile_report", *argv], env=env)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    try:
        targets = tuple(int(a.strip().replace("sm_", "")) for a in args.arch.split(",") if a.strip())
    except ValueError:
        print(f"compile-report: bad --arch {args.arch!r}; expected e.g. 80,90", file=sys.stderr)
        return 2
    if args.triton:
        import triton

        if triton.__version__ != args.triton:
            try:
                python = triton_env(args.triton)
            except RuntimeError as exc:
                print(f"compile-report: {exc}", file=sys.stderr)
                return 3
            return _rerun(_strip_triton_flag(argv), python)
    # the one rule (mmfast.kernels._common); under TRITON_INTERPRET=1 importing it turns this process's
    # kernels into interpreter objects, so the report runs in a child process without it
    from mmfast.kernels._common import interpreting

    if interpreting():
        if os.environ.get(_REEXEC_GUARD) == "1":
            print("compile-report: TRITON_INTERPRET is set; unset it to compile kernels", file=sys.stderr)
            return 2
        print("compile-report: TRITON_INTERPRET is set; re-running without it", file=sys.stderr)
        return _rerun(argv)

    start = time.perf_counter()
    print("compile-report: collecting the compile specs of every family ...", file=sys.stderr, flush=True)
    if args.specs:
        specs = [spec for ref in args.specs for spec in load_specs(ref)]
    else:
        specs = _triton_specs()
    if args.filter:
        specs = [s for s in specs if any(t in f"{s.name} {s.label}" for t in args.filter)]
    total = sum(_compiled_for(spec, cc) for spec in specs for cc in targets)
    with Progress(total, plain=args.plain) as progress:
        rows = run(targets=targets, include_cuda_sources=not args.no_nvcc, specs=specs, cu_files=args.cu,
                   progress=progress, on_start=progress.start)
    elapsed = time.perf_counter() - start
    import triton

    failed = [r for r in rows if r.failed]
    skipped = [r for r in rows if r.status == "skipped"]
    title = (f"compile-report: Triton {triton.__version__}, targets {', '.join(_sm(cc) for cc in targets)}, "
             f"{len(rows)} rows in {elapsed:.1f}s")
    out = sys.stdout
    if args.json == "-":
        out = sys.stderr
    print_table(rows, title, file=out, plain=args.plain)
    summary = f"{len(rows) - len(failed) - len(skipped)} ok, {len(failed)} failed, {len(skipped)} skipped"
    print(("FAILED: " if failed else "PASSED: ") + summary, file=out)
    if args.json:
        payload = json.dumps(
            {"targets": [_sm(cc) for cc in targets], "triton": triton.__version__, "seconds": round(elapsed, 2),
             "rows": [asdict(r) for r in rows]},
            indent=1,
        )
        if args.json == "-":
            print(payload)
        else:
            with open(args.json, "w") as f:
                f.write(payload + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
