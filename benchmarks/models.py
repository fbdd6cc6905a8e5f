"""Models suite: one training step (forward + backward + AdamW step) of mmfast's models against the same
weights in the implementations people train with, and the CLIP loss at a 32k batch per GPU.

Workloads (CUDA, quick and full): CLIP ViT-B/16 and ViT-L/14 at batch 256 (77-token text), each once against
Hugging Face's ``CLIPModel`` (SDPA attention, built from its config with random init, converted with
``CLIP.from_hf``) and once against open_clip (``open_clip.create_model``, converted with
``CLIP.from_open_clip``); BLIP base captioning (``BlipForConditionalGeneration``, ViT-B/16 at 224, batch 64,
32 tokens, LM loss) against Hugging Face (eager attention: transformers has no SDPA implementation of BLIP
and refuses to build one). Every step runs under bf16 autocast with fp32 weights and fused
AdamW. Targets (for the report, not for tests): mmfast ≥ 1.3x Hugging Face per step, ≥ 1.15x open_clip.
Images/s = batch x 1000 / ms (the workload's summary gives the batch).

The notes give each case's peak memory (``torch.cuda.max_memory_allocated`` over a steady-state step, the
weights and AdamW's moments included) and, for mmfast, each kernel family's share of the step: the CUDA time
of its ``mmfast::`` ops in one profiled step (their own kernels and the copies they launch; the ops do not
nest) over that step's wall time.

``clip_loss N=32768`` (the headline): the CLIP loss forward + backward on bf16 unit features (D = 512), mmfast's
``contrastive_loss`` against open_clip's ``ClipLoss``, which materialises the N x N logits; its out of memory is
reported as "OOM", the expected result where the card is too small for it.

Smoke (any device, seconds): the tiny presets on the reference backend, batch 2, no autocast.
"""
import gc
import math
import time
from collections import defaultdict

import torch

from .common import Case, Skip, Workload
from .contrastive import _features, _naive_loss, _step

HF_TARGET, OPEN_CLIP_TARGET = 1.3, 1.15
# benchmark size -> (mmfast preset, open_clip model name); tiny sizes are built from the tiny preset
CLIP_SIZES = {"ViT-B/16": ("clip-vit-b/16", "ViT-B-16"), "ViT-L/14": ("clip-vit-l/14", "ViT-L-14")}


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- model construction (each with seed 0: a case and its baseline start from the same weights) -------------

def _clip_args(preset):
    from mmfast.models import PRESETS

    return PRESETS[preset][1]


def _hf_clip(preset, device):
    import transformers

    a = _clip_args(preset)
    v, t = a["vision"], a["text"]
    vision = dict(hidden_size=v["embed_dim"], intermediate_size=4 * v["embed_dim"], num_hidden_layers=v["depth"],
                  num_attention_heads=v["num_heads"], image_size=v["img_size"], patch_size=v["patch_size"])
    text = dict(vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=4 * t["width"],
                num_hidden_layers=t["depth"], num_attention_heads=t["num_heads"], max_position_embeddings=t["max_len"],
                bos_token_id=t["vocab_size"] - 2, eos_token_id=t["vocab_size"] - 1)
    cfg = transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=a["projection_dim"])
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.CLIPModel._from_config(cfg, attn_implementation="sdpa")


def _open_clip(preset, oc_name, device):
    import open_clip

    torch.manual_seed(0)
    if oc_name is not None:
        return open_clip.create_model(oc_name, device=device)
    a = _clip_args(preset)
    v, t = a["vision"], a["text"]
    with torch.device(device):
        return open_clip.model.CLIP(
            a["projection_dim"],
            dict(layers=v["depth"], width=v["embed_dim"], head_width=v["embed_dim"] // v["num_heads"],
                 patch_size=v["patch_size"], image_size=v["img_size"]),
            dict(context_length=t["max_len"], vocab_size=t["vocab_size"], width=t["width"], heads=t["num_heads"],
                 layers=t["depth"]))


def _hf_blip(tiny, device):
    import transformers

    if tiny:
        cfg = transformers.BlipConfig(
            text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=32, bos_token_id=3, eos_token_id=2,
                             pad_token_id=0, sep_token_id=4),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=16, patch_size=8), image_text_hidden_size=16)
    else:  # BLIP base (bert-base text decoder, ViT-B/16) at the pre-training resolution
        cfg = transformers.BlipConfig(vision_config=dict(image_size=224))
    torch.manual_seed(0)
    with torch.device(device):
        # eager: transformers has no SDPA implementation of BLIP (it refuses attn_implementation="sdpa")
        return transformers.BlipForConditionalGeneration._from_config(cfg, attn_implementation="eager")


# ---- the training step, profiling, memory ------------------------------------------------------------------

def _family_of(op_name):
    from mmfast.kernels._registry import OPS

    op = op_name.split("::", 1)[1]
    for suffix in ("_fwd", "_bwd"):
        op = op[: -len(suffix)] if op.endswith(suffix) else op
    return OPS[op].name if op in OPS else op


def family_shares(step, device):
    """({family: share of one step's wall time}, the step's ms, the ms its kernels kept the device busy) from
    one profiled step: the mmfast:: ops' CUDA time on CUDA (CPU time elsewhere; busy None there)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        ms = (time.perf_counter() - t0) * 1e3
    per_family, busy = defaultdict(float), 0.0
    for evt in prof.key_averages():
        if cuda:
            busy += _device_us(evt, "self_") / 1e3
        if evt.key.startswith("mmfast::"):
            per_family[_family_of(evt.key)] += (_device_us(evt) if cuda else evt.cpu_time_total) / 1e3
    return {f: t / ms for f, t in per_family.items()}, ms, busy if cuda else None


def _device_us(evt, prefix=""):
    value = getattr(evt, f"{prefix}device_time_total", None)
    return getattr(evt, f"{prefix}cuda_time_total", 0.0) if value is None else value  # older torch: cuda_*


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gib(step, device):
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated() / 2**30


def _notes(step, device, profile_ours, what):
    step()  # AdamW allocates its moments in the first step: the second one is the steady state
    peak = _peak_gib(step, device)
    parts = [what, "peak —" if peak is None else f"peak {peak:.2f} GiB"]
    if profile_ours:
        shares, ms, busy = family_shares(step, device)
        fams = ", ".join(f"{f} {100 * s:.1f}%" for f, s in sorted(shares.items(), key=lambda kv: -kv[1]))
        busy = "" if busy is None else f", kernels busy {busy:.0f} ms"
        parts.append(f"share of a profiled step ({ms:.0f} ms{busy}): "
                     + (fams or "no mmfast:: op ran (reference backend)"))
    return "; ".join(parts)


def _train_case(name, build, note, ours):
    """A Case timing one training step of the (module, loss function of (module, inputs)) that
    `build(tiny, device, backend)` returns; the model lives in state["live"] so that building the next case
    frees it first (only one model at a time on the card)."""
    case = Case(name, None, note)

    def make(state):
        device, inputs = state["device"], state["inputs"]
        state["live"] = None
        _free(device)
        model, loss_fn = build(state["tiny"], device, state["backend"])
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
        state["live"] = (model, opt, loss_fn)

        def step():
            model, opt, loss_fn = state["live"]
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(model, inputs)
            loss.backward()
            opt.step()

        try:
            case.note = _notes(step, device, ours, note)
        except torch.cuda.OutOfMemoryError:
            state["live"] = model = opt = None
            _free(device)
            raise Skip(f"OOM ({note}, batch {inputs['pixels'].shape[0]})") from None
        return step

    case.make = make
    return case


def _clip_loss(model, inputs):
    return model(input_ids=inputs["ids"], pixel_values=inputs["pixels"], return_loss=True).loss


def _open_clip_loss(model, inputs):
    from open_clip.loss import ClipLoss

    img = model.encode_image(inputs["pixels"], normalize=True)
    txt = model.encode_text(inputs["ids"], normalize=True)
    return ClipLoss()(img, txt, model.logit_scale.exp())


def _blip_loss(model, inputs):
    return model(pixel_values=inputs["pixels"], input_ids=inputs["ids"], labels=inputs["ids"]).loss


def _clip_workload(size, ref, batch, tiny):
    preset, oc_name = CLIP_SIZES[size] if not tiny else ("clip-tiny-test", None)
    size = "tiny" if tiny else size
    a = _clip_args(preset)
    v, t = a["vision"], a["text"]

    def mm_from_hf(tiny, device, backend):
        from mmfast.models import CLIP

        hf = _hf_clip(preset, device)
        with torch.device(device):
            return CLIP.from_hf(hf, backend=backend), _clip_loss

    def mm_from_oc(tiny, device, backend):
        from mmfast.models import CLIP

        oc = _open_clip(preset, oc_name, device)
        with torch.device(device):
            return CLIP.from_open_clip(oc, backend=backend), _clip_loss

    if ref == "hf":
        cases = [_train_case("mmfast", mm_from_hf, "CLIP.from_hf", True),
                 _train_case("hf_sdpa", lambda tiny, d, b: (_hf_clip(preset, d), _clip_loss),
                             "transformers CLIPModel, SDPA", False)]
        label, target = "hf", HF_TARGET
    else:
        cases = [_train_case("mmfast", mm_from_oc, "CLIP.from_open_clip", True),
                 _train_case("open_clip", lambda tiny, d, b: (_open_clip(preset, oc_name, d), _open_clip_loss),
                             f"open_clip.create_model({oc_name!r}) + ClipLoss" if oc_name else
                             "open_clip.model.CLIP (tiny config) + ClipLoss", False)]
        label, target = "open_clip", OPEN_CLIP_TARGET
    s_img = (v["img_size"] // v["patch_size"]) ** 2 + 1
    flops = batch * (_tower_flops(s_img, v["embed_dim"], v["depth"])
                     + _tower_flops(t["max_len"], t["width"], t["depth"]))
    params = _clip_params(preset)
    info = {"model": f"CLIP {size}", "batch": batch, "reference": label, "target_speedup": target,
            # the headline: CLIP ViT-B/16's training step against Hugging Face's (issue 14's target)
            "params": params, "headline": ref == "hf" and size in ("ViT-B/16", "tiny"),
            "summary": f"CLIP {size} training step, batch {batch} (images/s = {batch}000 / ms), vs {label}; "
                       f"target >= {target}x"}
    return Workload(f"clip {size} b={batch} vs {label}", None, 40 * params, info, cases,
                    baselines={label: cases[1].name}, flops_per_call=int(flops)), (v, t)


def _tower_flops(s, w, depth, s_kv=0, w_kv=0):
    """FLOPs of forward + backward (3x forward) of `depth` pre-norm layers with a 4w MLP over s tokens per
    sample; with s_kv, also cross-attention to s_kv tokens of width w_kv."""
    per_layer = 2 * s * (4 * w * w + 8 * w * w) + 4 * s * s * w
    if s_kv:
        per_layer += 2 * s * 2 * w * w + 2 * s_kv * 2 * w_kv * w + 4 * s * s_kv * w
    return 3 * depth * per_layer


def _blip_params(tiny):
    from mmfast.models import BLIP

    with torch.device("meta"):
        model = BLIP.from_preset("tiny" if tiny else "base", parts=("lm",), use_momentum=False)
        return sum(p.numel() for p in model.parameters())


def _clip_params(preset):
    from mmfast.models import create_model

    with torch.device("meta"):
        return sum(p.numel() for p in create_model(preset).parameters())


def _build_inputs(kind, batch, tiny, dims, backend):
    """The build function of a workload: random pixels and tokens (no zeros: no padding; CLIP's EOS, the
    highest id, ends every row, where HF's and open_clip's argmax pooling read it)."""
    def build(device):
        g = torch.Generator(device=device).manual_seed(0)
        img, vocab, length = dims
        pixels = torch.randn(batch, 3, img, img, generator=g, device=device)
        ids = torch.randint(1, vocab - 1, (batch, length), generator=g, device=device)
        if kind == "clip":
            ids[:, -1] = vocab - 1
        return {"device": device, "tiny": tiny, "backend": backend, "live": None,
                "inputs": {"pixels": pixels, "ids": ids}}

    return build


def _blip_workload(batch, tiny):
    def mm(tiny, device, backend):
        from mmfast.models import BLIP

        hf = _hf_blip(tiny, device)
        with torch.device(device):
            return BLIP.from_hf(hf, backend=backend), _blip_loss

    cases = [_train_case("mmfast", mm, "BLIP.from_hf (BLIPForConditionalGeneration)", True),
             _train_case("hf_eager", lambda tiny, d, b: (_hf_blip(tiny, d), _blip_loss),
                         "transformers BlipForConditionalGeneration, eager attention (HF has no SDPA for BLIP)",
                         False)]
    img, patch, vw, vd, vocab, tw, td, length = (16, 8, 32, 2, 64, 32, 2, 8) if tiny else \
        (224, 16, 768, 12, 30524, 768, 12, 32)
    s_img = (img // patch) ** 2 + 1
    flops = batch * (_tower_flops(s_img, vw, vd) + _tower_flops(length, tw, td, s_img, vw) + 6 * length * tw * vocab)
    params = _blip_params(tiny)
    info = {"model": "BLIP base" if not tiny else "BLIP tiny", "batch": batch, "reference": "hf",
            "target_speedup": HF_TARGET, "params": params, "headline": False,
            "summary": f"BLIP captioning (LM loss) training step, batch {batch}, {length} tokens "
                       f"(images/s = {batch}000 / ms), vs hf; target >= {HF_TARGET}x"}
    wl = Workload(f"blip {'base' if not tiny else 'tiny'} b={batch} vs hf", None, 40 * params, info, cases,
                  baselines={"hf": "hf_eager"}, flops_per_call=int(flops))
    return wl, (img, vocab, length)


# ---- the CLIP loss at 32k ------------------------------------------------------------------------------------

def _loss_case(name, loss_of, note):
    case = Case(name, None, note)

    def make(state):
        a, b, t = _features(state)
        loss, which = loss_of()
        fn = _step(loss, a, b, t)
        device = a.device
        try:
            peak = _peak_gib(fn, device)
        except torch.cuda.OutOfMemoryError:
            a = b = t = fn = None
            _free(device)
            raise Skip(f"OOM ({which}, N={state[0].shape[0]}, D={state[0].shape[1]})") from None
        case.note = f"{which}; " + ("peak —" if peak is None else f"peak {peak:.2f} GiB (inputs, gradients included)")
        return fn

    case.make = make
    return case


def _mm_loss():
    from mmfast.kernels import contrastive_loss

    def loss(x, y, s):
        backend = "auto" if x.is_cuda else "chunked"
        return contrastive_loss(x, y, s, backend=backend)

    return loss, "mmfast contrastive_loss"


def _oc_loss():
    loss, which = _naive_loss()
    return (lambda x, y, s: loss(x, y, s.exp().clamp(max=100))), which


def _loss_workload(n, d, device):
    def build():
        g = torch.Generator(device=device).manual_seed(1)
        nf = torch.nn.functional
        a = nf.normalize(torch.randn(n, d, generator=g, device=device), dim=-1).to(torch.bfloat16)
        b = nf.normalize(torch.randn(n, d, generator=g, device=device), dim=-1).to(torch.bfloat16)
        return a, b, torch.tensor(math.log(1 / 0.07), device=device)

    cases = [_loss_case("mmfast", _mm_loss, ""), _loss_case("open_clip_ClipLoss", _oc_loss, "")]
    # not a headline: the contrastive suite's headline times the same loss at the same size (its peak memory
    # is in every row); the GPU check's short headline budget goes to workloads measured nowhere else
    info = {"N": n, "D": d, "headline": False,
            "summary": f"CLIP loss fwd+bwd at batch {n} per GPU, D={d}, bf16: peak memory of each (note); "
                       "open_clip's ClipLoss materialises the N x N logits (an out of memory reads OOM)"}
    return Workload(f"clip_loss N={n} D={d}", build, 4 * n * d * 2, info, cases,
                    baselines={"open_clip": "open_clip_ClipLoss"}, flops_per_call=6 * n * n * d)


# ---- the suite -----------------------------------------------------------------------------------------------

def workloads(mode, device):
    device = torch.device(device)
    tiny = mode == "smoke" or device.type != "cuda"
    backend = "reference" if mode == "smoke" else "auto"
    clip_batch = 2 if mode == "smoke" else 8 if tiny else 256
    blip_batch = 2 if mode == "smoke" else 8 if tiny else 64
    out = []
    for size in CLIP_SIZES if not tiny else ("tiny",):
        for ref in ("hf", "open_clip"):
            wl, (v, t) = _clip_workload(size, ref, clip_batch, tiny)
            wl.build = _bind(_build_inputs("clip", clip_batch, tiny, (v["img_size"], t["vocab_size"], t["max_len"]),
                                           backend), device)
            out.append(wl)
    wl, vision = _blip_workload(blip_batch, tiny)
    wl.build = _bind(_build_inputs("blip", blip_batch, tiny, vision, backend), device)
    out.append(wl)
    out.append(_loss_workload(*((256, 64) if tiny else (32768, 512)), device))
    return out


def _bind(build, device):
    return lambda: build(device)
