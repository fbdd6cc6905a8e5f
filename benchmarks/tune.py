"""python -m benchmarks tune --family attention [--budget-s N] [--shapes all|headline] [--dry-run] [--tables-dir DIR]
                          [--out DIR] [--no-gate]
(`python -m mmfast bench tune ...` is the same command)

Measures, on the GPU, the candidate tiles of a family's kernels at the benchmark suite's shapes and writes
the winner per (card, dtype, head-dim bucket, shape class) to the table the launchers read
(kernels/_tuned.py): kernels/<family>/tuned/<card>.json, or DIR/<family>/<card>.json with --tables-dir (or
$MMFAST_TUNED_DIR). Every timing goes to tune-<family>.json / .md in --out (default
benchmarks/results/<date>-<card>/ in a source checkout).

Order: per pass, the static choice first (the baseline every candidate is compared with), then the other
candidates, largest tiles first; each pass gets an equal share of --budget-s (time a pass leaves over goes
to the next). A candidate must pass the static compile gate for the card's architecture (no spills, shared
memory within limits; `--no-gate` skips it) and reproduce the static config's result (bf16 tolerance); one
that fails either is recorded with its reason and never wins. The winner of a key minimises the geometric
mean over the class's shapes of its time over the static choice's time; only candidates timed on every
shape of the class compete.

--dry-run: on the CPU through Triton's interpreter at smoke size (two tiny shapes, two candidates per pass),
writing the table to a temporary folder unless --tables-dir is given; proves the command end to end in CI.
Families with a tuner: attention.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict

PASSES = ("fwd", "dq", "dkdv")  # forward first: the headline number

# GPU candidates (block_m, block_n, num_warps, num_stages) besides the static choice, largest first; those
# that do not divide the block-mask tile are dropped. Forward: 128 x 64 up to the whole mask tile (the issue's
# bar); dK/dV: the tutorial's orientation (few query rows, many keys); dQ: many query rows, few keys.
_GPU_CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3), (128, 64, 8, 4), (128, 32, 8, 3), (64, 64, 4, 3),
            (64, 64, 4, 4), (64, 32, 4, 3)],
    "dkdv": [(64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3), (32, 64, 8, 2), (64, 32, 8, 2), (16, 64, 4, 3),
             (16, 64, 8, 2), (32, 32, 4, 3)],
    "dq": [(128, 64, 8, 2), (128, 32, 8, 2), (128, 32, 8, 3), (128, 16, 8, 2), (64, 64, 8, 2), (64, 64, 4, 3),
           (64, 32, 4, 3), (32, 64, 4, 3)],
}
_INTERPRETER_ALTERNATIVE = (16, 16, 4, 1)  # a second candidate under the interpreter: divides its 32 x 32 tile


def _parser(prog):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", action="append", metavar="NAMES", required=True,
                    help="comma-separated families, repeatable (families with a tuner: attention)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget of the sweep (default 300)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, smoke size, temporary table")
    ap.add_argument("--tables-dir", help="write the tables under DIR/<family>/ instead of kernels/<family>/tuned/")
    ap.add_argument("--out", help="folder for the sweep's timings (tune-<family>.json / .md)")
    ap.add_argument("--no-gate", action="store_true", help="skip the static compile gate of the candidates")
    ap.add_argument("--shapes", choices=("all", "headline"), default="all",
                    help="the suite's shapes and the headline ones (default), or only the headline ones (more "
                    "candidates in a short budget; the GPU check's choice)")
    return ap


# ----------------------------------------------------------------------------------------------
# Attention


def _attention_specs(dry_run, shapes):
    """The FlashAttention-3 paper's shapes (16k tokens, D = 64 / 128, causal and not) and, with shapes="all",
    the suite's model shapes; at smoke size two tiny ones (one causal) in the same shape class."""
    from . import attention as A

    if dry_run:
        return [A.Spec("tiny", 1, 24, 24, 1, 64), A.Spec("tiny_causal", 1, 20, 20, 1, 64, mask="causal")]
    return A.HEADLINE + (A.FULL if shapes == "all" else [])


def _attention_candidates(pass_, head_dim, interpreter):
    from mmfast.kernels.attention import _configs as C

    import torch

    static = C.launch_config(pass_, C.KERNELS[pass_], (), head_dim, torch.bfloat16, "ieee", interpreter) \
        if interpreter else C.get_config(pass_, head_dim, torch.bfloat16, "ieee")
    if interpreter:
        return [static, C.TileConfig(*_INTERPRETER_ALTERNATIVE)]
    mask_m, mask_n = C.mask_tile(False)
    out = [static]
    for values in _GPU_CANDIDATES[pass_]:
        cfg = C.TileConfig(*values)
        if cfg not in out and mask_m % cfg.block_m == 0 and mask_n % cfg.block_n == 0:
            out.append(cfg)
    return out


def _gate(pass_, head_dim, cfg, cc, cache):
    """None when the candidate compiles for sm_<cc> without spills (compile_report's rule), else the reason."""
    key = (pass_, head_dim, cfg, cc)
    if key not in cache:
        from dataclasses import replace

        import torch

        from mmfast.compile_report import check_spec
        from mmfast.kernels.attention import _configs as C

        spec = C._spec(pass_, torch.bfloat16, head_dim, "ieee")
        spec = replace(spec, constexprs={**spec.constexprs, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n},
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages, label=f"{pass_} tune candidate {cfg}")
        row = check_spec(spec, cc)
        cache[key] = f"static gate on {row.target}: {row.reason}" if row.failed else None
    return cache[key]


def _attention_state(spec, device):
    import torch

    from mmfast.kernels import build_block_mask

    from . import attention as A

    g = torch.Generator(device="cpu").manual_seed(len(spec.name))
    B, Lq, Lk, H, Hkv, D = spec.batch, spec.seqlen_q, spec.seqlen_k, spec.heads, spec.hkv, spec.head_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)

    q, k, v = (rand(B, Lq, H, D).requires_grad_(), rand(B, Lk, Hkv, D).requires_grad_(),
               rand(B, Lk, Hkv, D).requires_grad_())
    kwargs = {"causal": spec.mask == "causal", "backend": "triton"}
    iv = A._intervals(spec, device)
    if iv is not None:
        kwargs["block_mask"] = build_block_mask(Lq, Lk, kv_start=iv[0], kv_end=iv[1], device=device)
    return {"q": q, "k": k, "v": v, "do": rand(B, Lq, H, D), "kwargs": kwargs}


def _attention_fn(pass_, state):
    """The call to time for one pass: the forward, or the backward of a forward done once outside."""
    import torch

    from mmfast.kernels import flash_attention

    inputs = (state["q"], state["k"], state["v"])
    if pass_ == "fwd":
        return lambda: flash_attention(*inputs, **state["kwargs"])
    out = flash_attention(*inputs, **state["kwargs"])
    return lambda: torch.autograd.grad(out, inputs, state["do"], retain_graph=True)


def _close(result, expected):
    """Within bf16 rounding of another summation order (a wrong tile is off by O(1), not by 4%)."""
    import torch

    got = result if isinstance(result, tuple) else (result,)
    want = expected if isinstance(expected, tuple) else (expected,)
    for a, e in zip(got, want):
        scale = max(1.0, e.float().abs().max().item())
        if not torch.isfinite(a).all() or (a.float() - e.float()).abs().max().item() > 0.04 * scale:
            return False
    return True


def tune_attention(device, deadline_s, dry_run, gate, shapes="all", log=print):
    """{"rows": every (pass, spec, candidate) timing or skip, "configs": winners by table key}."""
    import torch

    from mmfast.kernels import _tuned
    from mmfast.kernels._common import interpreting
    from mmfast.kernels.attention import _configs as C

    from .common import measure, synchronize

    interpreter = interpreting()
    cc = None
    if gate and not interpreter:
        major, minor = torch.cuda.get_device_capability(device)
        cc = 10 * major + minor
    specs = _attention_specs(dry_run, shapes)
    states = {s.name: _attention_state(s, device) for s in specs}
    gate_cache, rows = {}, []
    start = time.monotonic()
    for i, pass_ in enumerate(PASSES):
        pass_deadline = start + deadline_s * (i + 1) / len(PASSES)
        for head_dim in sorted({s.head_dim for s in specs}):
            group = [s for s in specs if s.head_dim == head_dim]
            expected = {}
            for cfg in _attention_candidates(pass_, head_dim, interpreter):
                late = time.monotonic() > pass_deadline
                reason = "time budget" if late else _gate(pass_, head_dim, cfg, cc, gate_cache) if cc else None
                for spec in group:
                    key = _tuned.key(pass_, "bf16", C.table_bucket(pass_, head_dim), "16-bit",
                                     _tuned.shape_class(spec.seqlen_q, spec.seqlen_k))
                    row = {"pass": pass_, "key": key, "shape": spec.name, "config": asdict(cfg), "ms": None,
                           "reason": reason}
                    rows.append(row)
                    if row["reason"]:
                        continue
                    if time.monotonic() > pass_deadline:
                        row["reason"] = "time budget"
                        continue
                    try:
                        with _tuned.forcing("attention", {pass_: cfg}):
                            fn = _attention_fn(pass_, states[spec.name])
                            result = fn()
                            synchronize(device)
                            if spec.name not in expected:  # the static choice: the first candidate
                                expected[spec.name] = tuple(t.detach().clone() for t in
                                                            (result if isinstance(result, tuple) else (result,)))
                            elif not _close(result, expected[spec.name]):
                                row["reason"] = "wrong result (differs from the static config's)"
                                continue
                            row["ms"] = measure(fn, device, "smoke" if dry_run else "quick")["ms"]
                    except Exception as exc:  # a candidate the kernel rejects: recorded, never chosen
                        row["reason"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}" \
                            if str(exc).strip() else type(exc).__name__
                    log(f"  {pass_} {spec.name:<16} {_label(row['config'])}: "
                        + (f"{row['ms']:.3f} ms" if row["ms"] is not None else f"skipped: {row['reason']}"))
    return {"rows": rows, "configs": winners(rows)}


def _label(cfg):
    return f"{cfg['block_m']}x{cfg['block_n']} w{cfg['num_warps']} s{cfg['num_stages']}"


def winners(rows):
    """Per table key: the candidate with the lowest geometric mean of (its time / the static choice's time)
    over the key's shapes, among those timed on every one of them (the first config of a key is the static)."""
    out = {}
    for key in dict.fromkeys(r["key"] for r in rows):
        mine = [r for r in rows if r["key"] == key]
        shapes = list(dict.fromkeys(r["shape"] for r in mine))
        static = mine[0]["config"]
        base = {r["shape"]: r["ms"] for r in mine if r["config"] == static and r["ms"]}
        if len(base) < len(shapes):
            continue  # the baseline itself was not timed everywhere: nothing to compare with
        scores = {}
        for cfg_label in dict.fromkeys(_label(r["config"]) for r in mine):
            timed = {r["shape"]: r["ms"] for r in mine if _label(r["config"]) == cfg_label and r["ms"]}
            if len(timed) == len(shapes):
                scores[cfg_label] = math.exp(sum(math.log(timed[s] / base[s]) for s in shapes) / len(shapes))
        best = min(scores, key=scores.get)
        config = next(r["config"] for r in mine if _label(r["config"]) == best)
        out[key] = {"config": config, "static": static, "ratio_vs_static": round(scores[best], 4),
                    "ms": {s: next(r["ms"] for r in mine if r["shape"] == s and _label(r["config"]) == best)
                           for s in shapes},
                    "static_ms": base, "candidates_timed": len(scores)}
    return out


TUNERS = {"attention": tune_attention}


# ----------------------------------------------------------------------------------------------
# Tables and reports


def write_table(family, env, configs, tables_root, budget_s):
    """Merge `configs` into the (family, card) table and return its path."""
    from mmfast.kernels import _tuned

    folder = os.path.join(tables_root, family) if tables_root else _tuned.tables_dir(family)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, _tuned.card_slug(env["card"]) + ".json")
    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    if table.get("card") != env["card"] or table.get("schema") != _tuned.SCHEMA:
        table = {}
    merged = dict(table.get("configs", {}), **configs)
    table = {"schema": _tuned.SCHEMA, "family": family, "card": env["card"],
             **{k: env.get(k) for k in ("driver", "capability", "cuda_runtime", "triton", "torch", "date",
                                        "git_commit", "triton_interpreter")},
             "budget_s": budget_s, "configs": dict(sorted(merged.items()))}
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    return path


def sweep_markdown(family, env, result):
    lines = [f"# Tuning sweep: {family} on {env['card']}", "",
             f"triton {env['triton']}, torch {env['torch']}, driver {env.get('driver')}, {env['date']}", "",
             "| key | winner | static | time / static | candidates timed |", "|---|---|---|---:|---:|"]
    for key, e in result["configs"].items():
        cell = key.replace("|", "\\|")  # the key's separator inside a table cell
        lines.append(f"| {cell} | {_label(e['config'])} | {_label(e['static'])} | {e['ratio_vs_static']:.3f} "
                     f"| {e['candidates_timed']} |")
    skipped = [r for r in result["rows"] if r["ms"] is None]
    if skipped:
        lines += ["", f"{len(skipped)} of {len(result['rows'])} timings skipped; reasons:", ""]
        for reason in dict.fromkeys(r["reason"] for r in skipped):
            lines.append(f"- {sum(r['reason'] == reason for r in skipped)} x {reason}")
    return "\n".join(lines) + "\n"


def main(argv=None, prog="python -m benchmarks tune"):
    args = _parser(prog).parse_args(argv)
    families = [n.strip() for v in args.family for n in v.split(",") if n.strip()]
    unknown = [f for f in families if f not in TUNERS]
    if unknown:
        _parser(prog).error(f"no tuner for {unknown}; families with one: {', '.join(TUNERS)}")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before mmfast.kernels is imported: @jit decides then
    import torch

    from .common import default_out_dir, environment

    if not args.dry_run and not torch.cuda.is_available():
        print(f"{prog}: no CUDA device: the tuner measures GPU kernels (--dry-run runs it on the CPU)",
              file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    tables_root = args.tables_dir or (tempfile.mkdtemp(prefix="mmfast-tune-") if args.dry_run else None)
    env = environment(device)
    out = args.out or (tables_root if args.dry_run else default_out_dir({"env": env}))
    os.makedirs(out, exist_ok=True)
    budget = args.budget_s / len(families)
    status = 0
    for family in families:
        print(f"# tuning {family} on {env['card']} ({device}), budget {budget:.0f} s")
        result = TUNERS[family](device, budget, args.dry_run, gate=not args.no_gate, shapes=args.shapes)
        if not result["configs"]:
            print(f"{family}: no key was timed with its static baseline: no table written", file=sys.stderr)
            status = 1
            continue
        table = write_table(family, env, result["configs"], tables_root, args.budget_s)
        with open(os.path.join(out, f"tune-{family}.json"), "w") as f:
            json.dump({"family": family, "env": env, **result}, f, indent=1)
        with open(os.path.join(out, f"tune-{family}.md"), "w") as f:
            f.write(sweep_markdown(family, env, result))
        print(sweep_markdown(family, env, result))
        print(f"wrote: {table}\n       {os.path.join(out, f'tune-{family}.json')} (.md)")
    return status


if __name__ == "__main__":
    sys.exit(main())
