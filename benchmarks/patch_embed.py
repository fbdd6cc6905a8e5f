"""Patch embedding suite: the first op of every ViT, as the seed models run it (bf16).

Workloads (issue 6): ViT-B/16 at 224 (B=256), CLIP ViT-L/14 at 336 (B=128, its 577-row table), Llama 3.2
Vision tiles (B=16, 4 tiles of 560 x 560, D=1280, all tiles used; plus mmfast with half the tiles used). Cases,
forward and forward+backward:
- ``eager``: cuDNN F.conv2d + flatten/transpose + position add + [CLS] cat (timm / transformers' chain;
  Mllama's chain with its gated tile tables for the tiles workload);
- ``compiled``: that chain under torch.compile (skipped, with the reason, where compile fails);
- ``mmfast``: ``patch_embed`` / ``tile_patch_embed`` (Triton).
Forward+backward takes gradients for weight, bias, tables and [CLS] (pixels need none: the usual
training step), so it runs the d_weight GEMM and the table reductions, not d_images.

Work per call: FLOPs 2·rows·D·K (fwd) and 4·rows·D·K (fwd+bwd, the d_weight GEMM); bytes are the
minimal traffic: pixels read once, tokens written once, weight and tables read once (fwd), plus dOut
read and pixels read again (bwd). The report's `bound` column says which ceiling (copy bandwidth or
matmul TFLOP/s) limits each case. ``smoke``: tiny shapes on the CPU (Triton through the interpreter).
"""
import torch
import torch.nn.functional as F

from .common import Case, Skip, Workload

# (name, B, T tiles or 0, image side, P, D, table rows)
_FULL = [("vit_b16@224", 256, 0, 224, 16, 768, 197), ("vit_l14@336", 128, 0, 336, 14, 1024, 577),
         ("llama32_tiles@560", 16, 4, 560, 14, 1280, 1601)]
_SMOKE = [("vit_b16-tiny", 2, 0, 48, 16, 64, 10), ("vit_l14-tiny", 2, 0, 42, 14, 48, 10),
          ("llama32_tiles-tiny", 1, 2, 28, 14, 32, 5)]
R = 9  # Mllama's aspect-ratio ids for max_num_tiles = 4


def _build(B, T, side, P, D, rows, device, dtype=torch.bfloat16):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):  # random, never zeros
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    N = (side // P) ** 2
    state = {"images": rnd(B, T, 3, side, side) if T else rnd(B, 3, side, side),
             "weight": rnd(D, 3, P, P, scale=(3 * P * P) ** -0.5), "cls": rnd(D), "pos": rnd(rows, D, scale=0.02)}
    if T:
        state.update(pos_gate=rnd(1), tile_pos=rnd(R, T * (N + 1) * D, scale=0.02), tile_embed=rnd(R, T * D, scale=0.02),
                     tile_gate=rnd(1), ar=torch.arange(B, device=device) % R,
                     tile_mask=torch.ones(B, T, dtype=torch.bool, device=device))
    else:
        state["bias"] = rnd(D)
    return state


def _params(state):
    return [k for k in ("weight", "bias", "cls", "pos", "pos_gate", "tile_pos", "tile_embed", "tile_gate") if k in state]


def _eager_fn(state):
    if "tile_pos" in state:
        from mmfast.kernels.reference import tile_patch_embed_reference

        def f(images, weight, cls, pos, pos_gate, tile_pos, tile_embed, tile_gate):
            return tile_patch_embed_reference(images, weight, cls_token=cls, pos_embed=pos, pos_gate=pos_gate,
                                              tile_pos_embed=tile_pos, tile_embed=tile_embed, tile_embed_gate=tile_gate,
                                              aspect_ratio_ids=state["ar"])
        return f

    def f(images, weight, bias, cls, pos):  # timm VisionTransformer: patch_embed + _pos_embed
        P = weight.shape[-1]
        x = F.conv2d(images, weight, bias, stride=P).flatten(2).transpose(1, 2)
        x = torch.cat([cls.view(1, 1, -1).expand(x.shape[0], 1, -1), x], dim=1)
        return x + pos
    return f


def _mmfast_fn(state, half_tiles=False):
    from mmfast.kernels import patch_embed, tile_patch_embed

    if "tile_pos" in state:
        tile_mask = state["tile_mask"].clone()
        if half_tiles:  # e.g. wide images: half the tiles in use, the others neither read nor computed
            tile_mask[:, tile_mask.shape[1] // 2:] = False

        def f(images, weight, cls, pos, pos_gate, tile_pos, tile_embed, tile_gate):
            return tile_patch_embed(images, weight, cls_token=cls, pos_embed=pos, pos_gate=pos_gate,
                                    tile_pos_embed=tile_pos, tile_embed=tile_embed, tile_embed_gate=tile_gate,
                                    aspect_ratio_ids=state["ar"], tile_mask=tile_mask, backend="triton")
        return f

    def f(images, weight, bias, cls, pos):
        return patch_embed(images, weight, bias, pos_embed=pos, cls_token=cls, backend="triton")
    return f


def _args(state, grad):
    names = ["images"] + _params(state)
    return [state[n].detach().requires_grad_(grad and n != "images") for n in names]


def _case(kind, backward):
    def make(state):
        device = state["images"].device
        if kind.startswith("mmfast"):
            from mmfast.kernels._dispatch import interpreting

            if device.type != "cuda" and not interpreting():
                raise Skip("Triton needs CUDA or TRITON_INTERPRET=1")
            fn = _mmfast_fn(state, half_tiles=kind == "mmfast_half_tiles")
        else:
            fn = _eager_fn(state)
            if kind == "compiled":
                if device.type != "cuda":
                    raise Skip("torch.compile baseline timed on CUDA only (a CPU smoke run keeps to seconds)")
                try:
                    fn = torch.compile(fn)
                except Exception as exc:  # noqa: BLE001 - reported as the skip reason
                    raise Skip(f"torch.compile failed: {type(exc).__name__}: {exc}"[:200]) from None
        args = _args(state, backward)
        if not backward:
            def run():
                with torch.no_grad():
                    fn(*args)
            return run
        out = fn(*args)
        grad = torch.randn_like(out)

        def run():
            for a in args:
                a.grad = None
            fn(*args).backward(grad)
        return run
    return make


def workloads(mode, device):
    device = torch.device(device)
    shapes = _SMOKE if mode == "smoke" or device.type != "cuda" else _FULL
    out = []
    for name, B, T, side, P, D, rows in shapes:
        N, K = (side // P) ** 2, 3 * P * P
        G = B * max(T, 1)
        gemm_rows, tokens = G * N, G * (N + 1)
        flops = 2 * gemm_rows * D * K
        item = 2  # bf16
        pixels = G * 3 * side * side * item
        fwd_bytes = pixels + tokens * D * item + D * K * item + rows * D * item
        if T:  # each distinct aspect-ratio id's tile-position slice is read once
            fwd_bytes += min(B, R) * T * (N + 1) * D * item
        bwd_bytes = fwd_bytes + tokens * D * item + pixels + D * K * item
        info = {"B": B, "tiles": T, "image": side, "P": P, "D": D, "dtype": "bf16",
                "headline": name.startswith("vit_l14"),  # `bench --headline`: ViT-L/14
                "summary": f"B={B}{f' x {T} tiles' if T else ''} @ {side}px, P={P}, D={D}, N={N}; "
                           f"{flops / 1e9:.1f} GFLOP fwd, {fwd_bytes / 1e6:.1f} MB fwd"}
        build = lambda B=B, T=T, side=side, P=P, D=D, rows=rows: _build(B, T, side, P, D, rows, device)  # noqa: E731
        # one workload per direction, so every speed-up compares like with like (fwd with fwd)
        for backward in (False, True):
            suffix = "fwd+bwd" if backward else "fwd"
            chain = "Mllama's chain (conv, gated tile + position tables, cat)" if T else \
                "F.conv2d (cuDNN on GPU) + flatten/transpose + pos add + cat"
            cases = []
            for kind, note in (("mmfast", "one fused Triton launch (+ d_weight GEMM and table reductions in bwd)"),
                               ("eager", chain),
                               ("compiled", "the eager chain under torch.compile")):
                cases.append(Case(f"{kind}_{suffix}", _case(kind, backward), note,
                                  flops=2 * flops if backward else flops, bytes=bwd_bytes if backward else fwd_bytes))
            if T:
                cases.append(Case(f"mmfast_half_tiles_{suffix}", _case("mmfast_half_tiles", backward),
                                  "tile_mask: half the tiles used (2 of 4); unused tiles are not read or computed (rows zero)",
                                  flops=(2 * flops if backward else flops) // 2,
                                  bytes=(bwd_bytes if backward else fwd_bytes) // 2))
            out.append(Workload(f"{name} {suffix}", build, bwd_bytes if backward else fwd_bytes, info, cases,
                                baselines={"eager": f"eager_{suffix}", "compiled": f"compiled_{suffix}"},
                                flops_per_call=2 * flops if backward else flops))
    return out
