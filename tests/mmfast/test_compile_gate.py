"""GPU-readiness gate (mmfast/compile_report.py): kernels compile for sm_80 / sm_90 within limits.

Here: the gate's machinery on one family and on kernels that must fail. The gate over every family with
every supported Triton release (3.6, 3.8, 3.9) is a CI step (.ci/run); run it yourself with
`python -m mmfast compile-report`.

The gate compiles real @triton.jit kernels, which TRITON_INTERPRET=1 (set by tests/conftest.py on
CPU-only machines) forbids, so everything that compiles runs in a subprocess without TRITON_INTERPRET.
The parsers and the pass/fail rules are tested in-process on recorded tool output.
"""
import dataclasses
import json
import re
import os
import subprocess
import sys
import textwrap

import pytest

from mmfast import compile_report as cr

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = ("sm_80", "sm_90")


def _env(interpret=False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def _python(args, interpret=False, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(interpret), capture_output=True, text=True,
                          timeout=timeout)


def _run_script(code, timeout=900):
    res = _python(["-c", textwrap.dedent(code)], timeout=timeout)
    assert res.returncode == 0, f"subprocess failed:\n{res.stdout}\n{res.stderr}"
    return json.loads(res.stdout.strip().splitlines()[-1])


# Kernels that must fail the gate (and controls that must pass). Written to a file at test time: Triton
# reads a kernel's source from its file, and this module itself is imported under TRITON_INTERPRET=1.
BAD_KERNELS = '''
import triton
import triton.language as tl

from mmfast.kernels._registry import CompileSpec, step


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # bf16 tl.dot: wgmma on sm_90 needs 64 rows per warpgroup; BM = 32 with 4 warps lowers to mma.sync
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def transpose_kernel(x_ptr, y_ptr, BM: tl.constexpr, BN: tl.constexpr):
    # the layout conversion of a BM x BN fp32 tile goes through shared memory: 256 KiB at 256 x 256
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    x = tl.load(x_ptr + rm[:, None] * BN + rn[None, :])
    tl.store(y_ptr + rn[:, None] * BM + rm[None, :], tl.trans(x))


@triton.jit
def normalize_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # the whole row stays live across the reduction: BLOCK / 32 fp32 registers per thread with 1 warp
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    s = tl.sum(x * x, axis=0)
    tl.store(y_ptr + offs, x / s)


@triton.jit
def broken_kernel(x_ptr, BLOCK: tl.constexpr):
    tl.static_assert(BLOCK % 3 == 0)
    tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)


_T_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "BM": "constexpr", "BN": "constexpr"}
_N_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"}


def bad_specs():
    return [
        CompileSpec(kernel=transpose_kernel, signature=_T_SIG, constexprs={"BM": 256, "BN": 256},
                    num_warps=16, num_stages=1, label="too-much-shared BM=BN=256"),
        CompileSpec(kernel=normalize_kernel, signature=_N_SIG, constexprs={"BLOCK": 8192},
                    num_warps=1, num_stages=1, label="spills BLOCK=8192 warps=1"),
        CompileSpec(kernel=broken_kernel, signature={"x_ptr": "*fp32", "BLOCK": "constexpr"},
                    constexprs={"BLOCK": 64}, label="compile error BLOCK=64"),
    ]


def matmul_specs():
    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "K": "i32", "BM": "constexpr", "BN": "constexpr",
           "BK": "constexpr"}
    return [CompileSpec(kernel=matmul_kernel, signature=sig, constexprs={"BM": bm, "BN": 64, "BK": 32}, num_warps=4,
                        num_stages=2, label=f"bf16 dot BM={bm}", needs_wgmma=True, targets=(90,),
                        divisibility={"a_ptr": 16, "b_ptr": 16, "c_ptr": 16, "K": 16},
                        **step(dots=[(bm, 64, 32)], loads=[(bm, 32, "bf16"), (32, 64, "bf16")]))
            for bm in (32, 64)]


def good_specs():
    return [
        CompileSpec(kernel=transpose_kernel, signature=_T_SIG, constexprs={"BM": 64, "BN": 64},
                    num_warps=4, num_stages=1, label="ok BM=BN=64"),
        CompileSpec(kernel=normalize_kernel, signature=_N_SIG, constexprs={"BLOCK": 4096},
                    num_warps=1, num_stages=1, label="ok BLOCK=4096 warps=1"),
    ]
'''

CUDA_KERNELS = r'''
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cstdint>

namespace gate_test {
namespace {

__device__ inline float to_float(float v) { return v; }
__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline void store(float v, float* out) { *out = v; }
__device__ inline void store(float v, __nv_bfloat16* out) { *out = __float2bfloat16(v); }

template <typename T>
__global__ void axpy_kernel(const float* __restrict__ x, T* __restrict__ y, float a, int64_t n) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) store(a * x[i] + to_float(y[i]), &y[i]);
}

// 256 live values under a 32-register cap (1024 threads x 2 blocks per SM): ptxas must spill.
__global__ void __launch_bounds__(1024, 2) spill_kernel(const float* __restrict__ x, float* __restrict__ y,
                                                        const int* __restrict__ w) {
  float v[256];
#pragma unroll
  for (int k = 0; k < 256; ++k) v[k] = x[k * 1024 + threadIdx.x];
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < 256; ++k) acc = acc * v[255 - k] + v[k] * static_cast<float>(w[k]);
  y[threadIdx.x] = acc;
}

}  // namespace

void launch(const float* x, float* y, const int* w, int64_t n, cudaStream_t stream) {
  axpy_kernel<float><<<(n + 255) / 256, 256, 0, stream>>>(x, y, 2.f, n);
  axpy_kernel<__nv_bfloat16><<<(n + 255) / 256, 256, 0, stream>>>(x, reinterpret_cast<__nv_bfloat16*>(y), 2.f, n);
  spill_kernel<<<1, 1024, 0, stream>>>(x, y, w);
}

}  // namespace gate_test
'''


# ----------------------------------------------------------------------------------------------
# The gate: `python -m mmfast.compile_report` over csrc/*.cu and the specs of one family (the EMA's: the
# fewest). The gate over every family's specs, with every supported Triton release, is a CI step
# (.ci/run): it compiles ~300 kernels per release, minutes that `pytest tests` does not spend.

GATE_FAMILY = "ema"


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("gate") / "report.json"
    res = _python(["-m", "mmfast.compile_report", "--arch", "80,90", "--json", str(path),
                   "--specs", f"mmfast.kernels.{GATE_FAMILY}:compile_specs"])
    report = json.loads(path.read_text()) if path.exists() else None
    return res, report


@pytest.fixture(scope="module")
def expected_specs():
    """family -> (kernel name, label) of its specs, computed where the kernels are real JITFunctions."""
    return {family: [tuple(x) for x in specs] for family, specs in _run_script("""
        import json
        from mmfast.kernels._registry import FAMILIES
        print(json.dumps({f.name: [[s.name, s.label] for s in f.kernels.compile_specs()] for f in FAMILIES}))
    """).items()}


def test_every_family_has_compile_specs(expected_specs):
    from mmfast.kernels._registry import NAMES

    assert tuple(expected_specs) == NAMES
    for family, specs in expected_specs.items():
        assert specs, f"{family}: compile_specs() is empty"
        assert len(set(specs)) == len(specs), f"{family}: two specs share a kernel and label"


@pytest.mark.slow
def test_gate_passes_and_covers_every_spec(full_report, expected_specs):
    res, report = full_report
    assert res.returncode == 0, f"compile-report failed:\n{res.stdout}\n{res.stderr}"
    assert report is not None, res.stderr
    specs = expected_specs[GATE_FAMILY]
    triton_rows = [r for r in report["rows"] if r["source"] == "triton"]
    assert len(triton_rows) == len(specs) * len(TARGETS)
    got = sorted((r["kernel"], r["config"], r["target"]) for r in triton_rows)
    want = sorted((name, label, target) for name, label in specs for target in TARGETS)
    assert got == want
    for r in triton_rows:
        assert r["status"] == "ok", r
        assert r["registers"] and 0 < r["registers"] <= 255, r
        assert r["shared"] is not None and r["shared"] <= r["shared_limit"], r
    # the printed table has one line per row
    table_lines = [line for line in res.stdout.splitlines() if "sm_80" in line or "sm_90" in line]
    table_lines = [line for line in table_lines if not line.startswith("compile-report:")]
    assert len(table_lines) == len(report["rows"]), res.stdout
    for name, label in specs:
        # columns are separated by runs of spaces (or box characters): match whole cells, since one
        # label may extend another ("... stages=1" and "... stages=1 varlen")
        cells = [[c.strip() for c in re.split(r"\s{2,}|│|\|", line) if c.strip()] for line in table_lines]
        assert sum(label in row and name in row for row in cells) == len(TARGETS), (name, label)
    assert "PASSED" in res.stdout


@pytest.mark.slow
def test_gate_checks_csrc_cuda_sources(full_report):
    res, report = full_report
    assert report is not None, res.stderr
    sources = cr.cuda_sources()
    if not sources:
        pytest.skip("no csrc/*.cu to compile")
    nvcc_rows = [r for r in report["rows"] if r["source"] == "nvcc"]
    if cr.find_nvcc() is None:
        assert nvcc_rows and all(r["status"] == "skipped" and r["reason"] == "nvcc not found" for r in nvcc_rows)
        pytest.skip("nvcc not found")
    for path in sources:
        base = os.path.basename(path)
        for target in TARGETS:
            rows = [r for r in nvcc_rows if r["target"] == target and r["kernel"].split(":")[0] == base]
            assert rows, f"no nvcc rows for {base} on {target}"
            for r in rows:
                assert r["config"] == "nvcc"
                assert r["status"] == "ok", r


# ----------------------------------------------------------------------------------------------
# The gate must fail on bad kernels


@pytest.fixture
def bad_kernels(tmp_path):
    path = tmp_path / "gate_bad_kernels.py"
    path.write_text(BAD_KERNELS)
    return path


@pytest.mark.slow
def test_gate_fails_on_bad_triton_kernels(bad_kernels):
    rows = _run_script(f"""
        import json, dataclasses
        from mmfast import compile_report as cr
        specs = cr.load_specs({str(bad_kernels)!r} + ":bad_specs") + cr.load_specs({str(bad_kernels)!r} + ":good_specs")
        rows = [cr.check_spec(spec, cc) for spec in specs for cc in (80, 90)]
        print(json.dumps([dataclasses.asdict(r) for r in rows]))
    """)
    by_key = {(r["config"], r["target"]): r for r in rows}
    for target in TARGETS:
        shared = by_key[("too-much-shared BM=BN=256", target)]
        assert shared["status"] == "FAIL", shared
        assert shared["shared"] > shared["shared_limit"], shared
        assert "shared memory" in shared["reason"]

        spill = by_key[("spills BLOCK=8192 warps=1", target)]
        assert spill["status"] == "FAIL", spill
        assert spill["spill_stores"] > 0 and spill["spill_loads"] > 0, spill
        assert "spills" in spill["reason"]

        broken = by_key[("compile error BLOCK=64", target)]
        assert broken["status"] == "FAIL" and broken["reason"].startswith("compile error"), broken

        for label in ("ok BM=BN=64", "ok BLOCK=4096 warps=1"):
            good = by_key[(label, target)]
            assert good["status"] == "ok", good
            assert good["spill_stores"] == 0 and good["local"] == 0 and good["stack"] == 0, good
    assert by_key[("too-much-shared BM=BN=256", "sm_80")]["shared_limit"] == 166912
    assert by_key[("too-much-shared BM=BN=256", "sm_90")]["shared_limit"] == 232448


@pytest.mark.slow
def test_gate_fails_a_16bit_dot_that_lowers_to_mma_sync_on_sm_90(bad_kernels):
    rows = _run_script(f"""
        import json, dataclasses
        from mmfast import compile_report as cr
        rows = [cr.check_spec(spec, 90) for spec in cr.load_specs({str(bad_kernels)!r} + ":matmul_specs")]
        print(json.dumps([dataclasses.asdict(r) for r in rows]))
    """)
    small, large = rows
    assert small["mma"] == "mma.sync" and small["status"] == "FAIL", small
    assert "not wgmma" in small["reason"]
    assert large["mma"] == "wgmma" and large["status"] == "ok", large
    for row in rows:
        assert row["tma"] is False and row["warps"] == 4 and row["needs_wgmma"]
        assert row["ctas_per_sm"] == cr.occupancy(90, row["registers"], row["shared"], 4)[0] > 0
    # 2·BM·64·32 FLOPs over (BM·32 + 32·64) bf16 elements
    assert small["intensity"] == round(2 * 32 * 64 * 32 / (2 * (32 * 32 + 32 * 64)), 1)
    assert large["intensity"] == 32.0


def test_mma_family_and_tma_from_ptx():
    assert cr.mma_family("  wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...}") == "wgmma"
    assert cr.mma_family("\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...}") == "mma.sync"
    assert cr.mma_family("wgmma.mma_async.x\nmma.sync.aligned.y") == "wgmma+mma.sync"
    assert cr.mma_family("fma.rn.f32 %f1, %f2, %f3, %f4;\n// mma.sync in a comment") == "none"
    assert cr.uses_tma("\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], ...")
    assert not cr.uses_tma("\tcp.async.cg.shared.global [%r1], [%rd2], 16;")


@pytest.mark.parametrize(
    "cc, registers, shared, warps, expected",
    [
        (90, 48, 6144, 4, (10, 40, "registers")),  # 48 x 32 = 1536 registers per warp: 42 warps
        (90, 255, 0, 8, (1, 8, "registers")),  # 256 x 32 per warp: 8 warps
        (90, 32, 100 * 1024, 4, (2, 8, "shared")),  # 228 KiB per SM, 1 KiB reserved per CTA
        (80, 32, 100 * 1024, 4, (1, 4, "shared")),  # 164 KiB per SM
        (90, 16, 0, 1, (32, 32, "ctas")),
        (80, 32, 0, 32, (2, 64, "registers")),  # 64 warps per SM from registers and from the warp limit
    ],
)
def test_occupancy(cc, registers, shared, warps, expected):
    ctas, warps_per_sm, limit = cr.occupancy(cc, registers, shared, warps)
    assert (ctas, warps_per_sm) == expected[:2]
    assert limit in (expected[2], "warps")


def test_wgmma_rule_applies_to_marked_rows_on_sm_90_only():
    base = dict(registers=40, shared=0, local=0, stack=0, spill_stores=0, spill_loads=0, mma="mma.sync")
    assert cr._judge(cr.Row(kernel="k", config="c", target="sm_90", needs_wgmma=True, **base)).status == "FAIL"
    assert cr._judge(cr.Row(kernel="k", config="c", target="sm_80", needs_wgmma=True, **base)).status == "ok"
    assert cr._judge(cr.Row(kernel="k", config="c", target="sm_90", **base)).status == "ok"
    both = dict(base, mma="wgmma+mma.sync")
    assert cr._judge(cr.Row(kernel="k", config="c", target="sm_90", needs_wgmma=True, **both)).status == "FAIL"


@pytest.mark.slow
def test_gate_cli_exit_code_on_bad_kernel(bad_kernels, tmp_path):
    out = tmp_path / "bad.json"
    res = _python(["-m", "mmfast.compile_report", "--no-nvcc", "--arch", "90", "--plain",
                   "--specs", f"{bad_kernels}:bad_specs", "--json", str(out)])
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAILED" in res.stdout
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 and all(r["status"] == "FAIL" for r in rows)
    assert len([line for line in res.stdout.splitlines() if " sm_90 " in line]) == 3, res.stdout


@pytest.mark.slow
def test_gate_reruns_itself_without_triton_interpret(bad_kernels):
    res = _python(["-m", "mmfast.compile_report", "--no-nvcc", "--arch", "80", "--plain",
                   "--specs", f"{bad_kernels}:good_specs"], interpret=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "without it" in res.stderr
    assert "PASSED: 2 ok" in res.stdout
    assert "[2/2] sm_80" in res.stderr  # progress, one line per compiled row on a non-terminal


def test_run_refuses_under_triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cr.run(specs=[], include_cuda_sources=False)


@pytest.mark.slow
def test_gate_nvcc_rows_and_spills(tmp_path):
    if cr.find_nvcc() is None:
        pytest.skip("nvcc not found")
    cu = tmp_path / "gate_test.cu"
    cu.write_text(CUDA_KERNELS)
    rows = _run_script(f"""
        import json, dataclasses
        from mmfast import compile_report as cr
        rows = cr.run(targets=(80, 90), specs=[], cu_files=[{str(cu)!r}])
        print(json.dumps([dataclasses.asdict(r) for r in rows]))
    """)
    assert {r["target"] for r in rows} == set(TARGETS)
    for target in TARGETS:
        mine = {r["kernel"]: r for r in rows if r["target"] == target}
        assert all(r["config"] == "nvcc" and r["source"] == "nvcc" for r in mine.values())
        axpy = [r for k, r in mine.items() if "axpy_kernel" in k]
        spill = [r for k, r in mine.items() if "spill_kernel" in k]
        assert len(axpy) == 2 and len(spill) == 1, sorted(mine)
        assert all(k.startswith("gate_test.cu:gate_test::") for k in mine), sorted(mine)  # demangled
        for r in axpy:
            assert r["status"] == "ok" and r["registers"] > 0, r
        assert spill[0]["status"] == "FAIL" and spill[0]["spill_stores"] > 0, spill[0]


@pytest.mark.slow
def test_gate_reports_nvcc_compile_errors(tmp_path):
    if cr.find_nvcc() is None:
        pytest.skip("nvcc not found")
    cu = tmp_path / "broken.cu"
    cu.write_text("__global__ void k(float* x) { x[0] = undefined_symbol; }\n")
    rows = [dataclasses.asdict(r) for r in cr.check_cuda_source(str(cu), (80, 90))]
    assert [r["target"] for r in rows] == list(TARGETS)
    assert all(r["status"] == "FAIL" and "compile error" in r["reason"] for r in rows), rows


def test_cuda_rows_skipped_without_nvcc(tmp_path, monkeypatch):
    monkeypatch.setattr(cr, "find_nvcc", lambda: None)
    rows = cr.check_cuda_source(str(tmp_path / "x.cu"), (80, 90))
    assert [(r.status, r.reason, r.target) for r in rows] == [("skipped", "nvcc not found", t) for t in TARGETS]
    assert not any(r.failed for r in rows)


# ----------------------------------------------------------------------------------------------
# Parsers and rules, on recorded tool output (fast, in-process)

CUOBJDUMP = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _Z4axpyPfS_:
  REG:10 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:560 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function spill:
  REG:32 STACK:1376 SHARED:0 LOCAL:8 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

PTXAS = """
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4axpyPfS_' for 'sm_80'
ptxas info    : Function properties for _Z4axpyPfS_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers, 4096 bytes smem, 384 bytes cmem[0]
ptxas info    : Compiling entry function 'spill' for 'sm_90a'
ptxas info    : Function properties for spill
    1376 bytes stack frame, 1456 bytes spill stores, 1452 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 1376 bytes cumulative stack size
"""


def test_parse_resource_usage():
    usage = cr.parse_resource_usage(CUOBJDUMP)
    assert usage[("sm_90", "_Z4axpyPfS_")]["REG"] == 10
    assert usage[("sm_90", "spill")] == {"REG": 32, "STACK": 1376, "SHARED": 0, "LOCAL": 8, "CONSTANT[0]": 552,
                                         "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}


def test_parse_ptxas_log():
    info = cr.parse_ptxas_log(PTXAS)
    assert info[("sm_80", "_Z4axpyPfS_")] == {"registers": 10, "shared": 4096, "stack": 0, "spill_stores": 0,
                                              "spill_loads": 0}
    assert info[("sm_90a", "spill")] == {"registers": 32, "shared": 0, "stack": 1376, "spill_stores": 1456,
                                         "spill_loads": 1452}


def test_short_name():
    assert cr._short_name("void mmfast::(anonymous namespace)::ema_kernel<float, c10::BFloat16>(long const*, int)") \
        == "mmfast::ema_kernel<float, c10::BFloat16>"
    assert cr._short_name("plain_kernel") == "plain_kernel"


@pytest.mark.parametrize(
    "fields, status, reason",
    [
        (dict(registers=40, shared=2048, local=0, stack=0, spill_stores=0, spill_loads=0), "ok", ""),
        (dict(registers=40, shared=232448, local=0, stack=0, spill_stores=0, spill_loads=0), "ok", ""),
        (dict(registers=40, shared=232449, local=0, stack=0, spill_stores=0, spill_loads=0), "FAIL", "shared memory"),
        (dict(registers=255, shared=0, local=0, stack=8, spill_stores=8, spill_loads=8), "FAIL", "spills"),
        (dict(registers=40, shared=0, local=16, stack=0, spill_stores=0, spill_loads=0), "FAIL", "local memory"),
        (dict(registers=40, shared=0, local=0, stack=64, spill_stores=0, spill_loads=0), "ok", "no spills"),
    ],
)
def test_judge(fields, status, reason):
    row = cr._judge(cr.Row(kernel="k", config="c", target="sm_90", shared_limit=cr.SHARED_LIMITS[90], **fields))
    assert row.status == status
    assert reason in row.reason


def test_shared_limits():
    assert cr.SHARED_LIMITS[80] == 163 * 1024 == 166912
    assert cr.SHARED_LIMITS[90] == 227 * 1024 == 232448


def test_plain_table_has_one_line_per_row():
    rows = [cr.Row(kernel="k", config=f"cfg {i}", target=t, registers=32, shared=0, local=0, stack=0,
                   spill_stores=0, spill_loads=0) for i in range(3) for t in TARGETS]
    text = cr.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["kernel", "config", "target"]
    assert len(lines) == 2 + len(rows)


# ----------------------------------------------------------------------------------------------
# Other Triton releases. The gate on them (`compile-report --triton 3.6.0` etc.) and `mmfast check` with
# their interpreters are CI steps (.ci/run): they install those releases. Here: the cached environment
# they run in is keyed by what it layers over and sees this environment's packages.


def test_triton_env_key_follows_the_environment(monkeypatch):
    import importlib.metadata

    key = cr.triton_env_key("3.9.0")
    assert key == cr.triton_env_key("3.9.0") and key != cr.triton_env_key("3.6.0")
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.11.0" if name == "torch" else real(name))
    assert cr.triton_env_key("3.9.0") != key  # another torch: another environment
    monkeypatch.undo()
    monkeypatch.setattr(sys, "executable", "/elsewhere/bin/python")
    assert cr.triton_env_key("3.9.0") != key  # layered over another python


def test_triton_3_6_gets_a_numpy_its_interpreter_takes():
    assert cr._extra_pins("3.6.0") == ["numpy<2.3"]
    assert cr._extra_pins("3.9.0") == [] and cr._extra_pins("3.60.0") == []


@pytest.mark.slow
def test_layered_env_sees_this_environments_packages(tmp_path):
    """A venv over this one imports mmfast.kernels from where this environment does: an editable install's
    mapping of kernels/ to mmfast.kernels is not visible from a venv layered over a venv by itself."""
    python = cr.layered_env(str(tmp_path / "env"))
    code = ("import mmfast.kernels, mmfast.benchmarks, torch, sys; "
            "print(mmfast.kernels.__file__, torch.__version__, sys.prefix)")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    kernels_file, torch_version, prefix = res.stdout.split()
    import mmfast.kernels
    import torch

    assert os.path.realpath(kernels_file) == os.path.realpath(mmfast.kernels.__file__)
    assert torch_version == torch.__version__ and os.path.realpath(prefix) == os.path.realpath(tmp_path / "env")


def test_triton_flag_is_not_passed_on():
    assert cr._strip_triton_flag(["--triton", "3.6.0", "--no-nvcc"]) == ["--no-nvcc"]
    assert cr._strip_triton_flag(["--json", "x", "--triton=3.9.0"]) == ["--json", "x"]
