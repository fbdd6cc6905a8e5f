"""swap suite: whole Hugging Face models before vs after ``mmfast.patch``, forward and training step.

One workload per model and direction: ``fwd`` (forward under ``torch.no_grad``) and ``train`` (forward,
backward and an AdamW step on one random batch). Cases: ``sdpa`` (the stock model, attn_implementation
"sdpa"; BLIP (v1) has no interface and runs its own eager attention) and ``mmfast`` (the same instance after
``mmfast.patch(model)``; unpatched again before the next workload). The ``mmfast`` row's note gives the
share of the step's time spent in mmfast kernels: torch.profiler over one call, the device time of the
``mmfast::`` custom ops (their kernels included, also those of the few aten ops inside them; CPU time
on the CPU) over the call's wall-clock time outside the profiler.

Targets (issue 13; in each workload's title): ``train`` >= 1.2x SDPA on every vision-language model,
>= 1.5x on Mllama and Idefics (their cross-attention runs without flash attention in transformers);
never slower than SDPA anywhere (ViT's target, and every ``fwd``: >= 1.0x). Headline (``bench --headline``):
CLIP's training step; the other workloads run in ``--rest``.

Sizes (``full`` / ``quick``): each model's real widths, heads, image sizes and sequence lengths with
2-4 layers per tower; language models keep a 32k vocabulary (Mllama's 128k would make the training
step mostly the embedding's optimizer update). bf16 weights and AdamW on them, ``eval()`` mode (no
dropout: both cases compute the same function). GB/s counts the weights read once per call (x3 for
``train``): a label, not a roofline. ``smoke``: the test-size configs (width 32, 1-3 layers) on the CPU
in fp32 with backend "reference", which proves every model builds, patches and steps.
"""
from dataclasses import dataclass, field
import time

import torch

from .common import Case, Skip, Workload

VOCAB = 32000
# `bench --headline` (the GPU check's first, short step): one VLM's training step, quick to build
HEADLINE = ("clip_l14 train",)


@dataclass(frozen=True)
class Spec:
    name: str
    build: object  # (size dict) -> model
    inputs: object  # (size dict, batch, generator) -> dict of CPU tensors
    batch: int
    target: float  # train-step speed-up over SDPA the issue asks for
    medium: dict = field(default_factory=dict)
    tiny: dict = field(default_factory=dict)
    loss: object = None  # (output, batch) -> scalar; default output.loss
    summary: str = ""


def _tf():
    import transformers

    return transformers


def _ids(g, batch, length, high):
    return torch.randint(3, high, (batch, length), generator=g)


def _px(g, *shape):
    return torch.randn(*shape, generator=g)


def _labels(ids, image_token):
    return ids.masked_fill(ids == image_token, -100)


# ----------------------------------------------------------------------------------------------
# Models (medium: real widths, few layers; tiny: the test suite's sizes)

def _vit(s):
    t = _tf()
    return t.ViTForImageClassification(t.ViTConfig(hidden_size=s["d"], intermediate_size=4 * s["d"],
                                                   num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                                   image_size=s["image"], patch_size=s["patch"], num_labels=1000))


def _vit_inputs(s, b, g):
    return dict(pixel_values=_px(g, b, 3, s["image"], s["image"]), labels=torch.randint(0, 1000, (b,), generator=g))


def _tower(s, prefix):
    d = s[prefix + "d"]
    return dict(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=s["layers"],
                num_attention_heads=s[prefix + "heads"])


def _clip(s):
    t = _tf()
    cfg = t.CLIPConfig(vision_config=dict(_tower(s, "v"), image_size=s["image"], patch_size=s["patch"]),
                       text_config=dict(_tower(s, "t"), vocab_size=s["vocab"], max_position_embeddings=s["text"],
                                        eos_token_id=2), projection_dim=s["proj"])
    return t.CLIPModel(cfg)


def _siglip(s):
    t = _tf()
    cfg = t.SiglipConfig(vision_config=dict(_tower(s, "v"), image_size=s["image"], patch_size=s["patch"]),
                         text_config=dict(_tower(s, "t"), vocab_size=s["vocab"], max_position_embeddings=s["text"]))
    return t.SiglipModel(cfg)


def _contrastive_inputs(s, b, g):
    return dict(input_ids=_ids(g, b, s["text"], s["vocab"]), pixel_values=_px(g, b, 3, s["image"], s["image"]),
                return_loss=True)


def _blip(s):
    t = _tf()
    cfg = t.BlipConfig(vision_config=dict(_tower(s, "v"), image_size=s["image"], patch_size=s["patch"]),
                       text_config=dict(_tower(s, "t"), vocab_size=s["vocab"], max_position_embeddings=s["text"] + 8,
                                        encoder_hidden_size=s["vd"], bos_token_id=1, sep_token_id=2, pad_token_id=0),
                       projection_dim=s["proj"])
    return t.BlipForConditionalGeneration(cfg)


def _blip_inputs(s, b, g):
    ids = _ids(g, b, s["text"], s["vocab"] - 1)
    return dict(pixel_values=_px(g, b, 3, s["image"], s["image"]), input_ids=ids, labels=ids.clone())


def _blip2(s):
    t = _tf()
    cfg = t.Blip2Config(
        vision_config=dict(_tower(s, "v"), image_size=s["image"], patch_size=s["patch"]),
        qformer_config=dict(_tower(s, "q"), vocab_size=30522, encoder_hidden_size=s["vd"]),
        text_config=dict(model_type="opt", hidden_size=s["td"], ffn_dim=4 * s["td"], num_hidden_layers=s["tlayers"],
                         num_attention_heads=s["theads"], vocab_size=s["vocab"], word_embed_proj_dim=s["td"],
                         max_position_embeddings=2048),
        num_query_tokens=s["queries"], image_token_index=s["vocab"] - 1)
    return t.Blip2ForConditionalGeneration(cfg)


def _blip2_inputs(s, b, g):
    image = s["vocab"] - 1
    ids = torch.cat([torch.full((b, s["queries"]), image), _ids(g, b, s["text"], image)], 1)
    return dict(pixel_values=_px(g, b, 3, s["image"], s["image"]), input_ids=ids, labels=_labels(ids, image))


def _llama(s):
    return dict(model_type="llama", hidden_size=s["td"], intermediate_size=s["tffn"], num_hidden_layers=s["tlayers"],
                num_attention_heads=s["theads"], num_key_value_heads=s["tkv"], vocab_size=s["vocab"],
                max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _clip_vision(s):
    # 3 layers at least: LLaVA reads the second-to-last layer's features
    return dict(_tower(s, "v"), num_hidden_layers=max(3, s["layers"]), image_size=s["image"], patch_size=s["patch"],
                model_type="clip_vision_model", projection_dim=s["proj"])


def _llava(s):
    t = _tf()
    return t.LlavaForConditionalGeneration(t.LlavaConfig(vision_config=_clip_vision(s), text_config=_llama(s),
                                                         image_token_index=s["vocab"] - 1))


def _llava_next(s):
    t = _tf()
    # one 1 x 2 grid (a wide image): the base view and two tiles
    cfg = t.LlavaNextConfig(vision_config=_clip_vision(s), text_config=_llama(s), image_token_index=s["vocab"] - 1,
                            image_grid_pinpoints=[[s["image"], 2 * s["image"]]])
    return t.LlavaNextForConditionalGeneration(cfg)


def _llava_inputs(s, b, g, next_=False):
    n = s["image"] // s["patch"]
    tokens = n * n + (n * (2 * n + 1) if next_ else 0)  # base view (+ the 1 x 2 grid, a newline per row)
    image = s["vocab"] - 1
    ids = torch.cat([torch.full((b, tokens), image), _ids(g, b, s["text"], image)], 1)
    out = dict(input_ids=ids, labels=_labels(ids, image))
    if next_:
        out.update(pixel_values=_px(g, b, 3, 3, s["image"], s["image"]),
                   image_sizes=torch.tensor([[s["image"], 2 * s["image"]]] * b))
    else:
        out.update(pixel_values=_px(g, b, 3, s["image"], s["image"]))
    return out


def _mllama(s):
    t = _tf()
    cfg = t.MllamaConfig(
        vision_config=dict(hidden_size=s["vd"], num_hidden_layers=s["layers"], num_global_layers=1,
                           attention_heads=s["vheads"], intermediate_size=4 * s["vd"], vision_output_dim=2 * s["vd"],
                           image_size=s["image"], patch_size=s["patch"], max_num_tiles=s["tiles"],
                           intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1], [2, 2]]),
        text_config=dict(_llama(s), cross_attention_layers=[1], max_position_embeddings=4096),
        image_token_index=s["vocab"] - 1)
    model = t.MllamaForConditionalGeneration(cfg)
    _open_gates(model, "gate")
    return model


def _mllama_inputs(s, b, g):
    image, tiles = s["vocab"] - 1, s["tiles"]
    ids = _ids(g, b, s["text"], image)
    ids[:, 2] = image
    xmask = torch.zeros(b, s["text"], 1, tiles, dtype=torch.long)
    xmask[:, 2:] = 1  # every tile, from the image on; the text before it sees none
    ar_id = [[1, 1], [1, 2], [2, 1], [2, 2]].index([1, 2] if tiles == 2 else [2, 2]) + 1
    return dict(input_ids=ids, labels=ids.clone(), pixel_values=_px(g, b, 1, tiles, 3, s["image"], s["image"]),
                aspect_ratio_ids=torch.full((b, 1), ar_id), aspect_ratio_mask=torch.ones(b, 1, tiles, dtype=torch.long),
                cross_attention_mask=xmask)


def _idefics(s):
    t = _tf()
    cfg = t.IdeficsConfig(
        vocab_size=s["vocab"], additional_vocab_size=2, hidden_size=s["td"], intermediate_size=s["tffn"],
        num_hidden_layers=s["tlayers"], num_attention_heads=s["theads"], cross_layer_interval=1,
        alpha_initializer="ones", alpha_type="vector", freeze_text_layers=False, freeze_vision_layers=False,
        use_resampler=True, max_position_embeddings=4096,
        vision_config=dict(embed_dim=s["vd"], image_size=s["image"], patch_size=s["patch"], num_hidden_layers=s["layers"],
                           num_attention_heads=s["vheads"], intermediate_size=4 * s["vd"]),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=s["latents"], resampler_depth=2,
                              resampler_n_heads=s["pheads"], resampler_head_dim=s["phead_dim"]))
    model = t.IdeficsForVisionText2Text(cfg)
    _open_gates(model, "alpha_")
    return model


def _idefics_inputs(s, b, g):
    L, half = s["text"], s["text"] // 2
    iam = torch.zeros(b, L, 2, dtype=torch.long)
    iam[:, 2:half, 0] = 1  # rows 0-1 see no image (gated out)
    iam[:, half:, 1] = 1
    return dict(input_ids=_ids(g, b, L, s["vocab"]), image_attention_mask=iam,
                pixel_values=_px(g, b, 2, 3, s["image"], s["image"]))


def _idefics_loss(out, batch):
    # transformers' Idefics loss views the logits as vocab_size wide, not vocab + additional: our own
    ids = batch["input_ids"]
    return torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _open_gates(model, key):
    """The gates start at 0 (or 1): random ones, so the gated branches carry signal."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name and p.numel() <= 4096 and p.dim() <= 1:
                p.normal_(0.0, 0.7)


TINY = dict(d=32, heads=2, vd=32, vheads=2, td=32, theads=2, tkv=1, tffn=64, qd=32, qheads=2, layers=1, tlayers=2,
            image=16, patch=4, text=8, vocab=100, proj=16, queries=4, tiles=2, latents=4, pheads=2, phead_dim=8)
_CLIP_L = dict(vd=1024, vheads=16, layers=4, patch=14)
_LLAMA_7B = dict(td=4096, theads=32, tkv=32, tffn=11008, tlayers=2, vocab=VOCAB)

SPECS = [
    Spec("vit_b16", _vit, _vit_inputs, 64, 1.0, dict(d=768, heads=12, layers=4, image=224, patch=16),
         summary="ViT-B/16 @224, 4 layers"),
    Spec("clip_l14", _clip, _contrastive_inputs, 64, 1.2,
         dict(_CLIP_L, image=224, td=768, theads=12, text=77, vocab=49408, proj=768),
         summary="CLIP ViT-L/14 @224 + text 768, 4 layers each, CLIP loss"),
    Spec("siglip_b16", _siglip, _contrastive_inputs, 64, 1.2,
         dict(vd=768, vheads=12, layers=4, image=224, patch=16, td=768, theads=12, text=64, vocab=VOCAB),
         summary="SigLIP B/16 @224 + text 768, 4 layers each, sigmoid loss"),
    Spec("blip_base", _blip, _blip_inputs, 16, 1.2,
         dict(vd=768, vheads=12, layers=4, image=384, patch=16, td=768, theads=12, text=32, vocab=30524, proj=512),
         summary="BLIP base captioning @384, 4 layers each, LM loss"),
    Spec("blip2_opt", _blip2, _blip2_inputs, 8, 1.2,
         dict(vd=1408, vheads=16, layers=4, image=224, patch=14, qd=768, qheads=12, td=2560, theads=32, tlayers=2,
              text=32, vocab=50272, queries=32),
         summary="BLIP-2 OPT-2.7b: EVA ViT-g/14 4 layers, Q-Former 4 layers, OPT 2 layers, LM loss"),
    Spec("llava15_7b", _llava, lambda s, b, g: _llava_inputs(s, b, g), 4, 1.2,
         dict(_CLIP_L, **_LLAMA_7B, layers=3, image=336, text=128, proj=768),
         summary="LLaVA-1.5-7B: CLIP-L/14 @336 3 layers, Llama 2 layers, 576 image + 128 text tokens"),
    Spec("llava_next_7b", _llava_next, lambda s, b, g: _llava_inputs(s, b, g, next_=True), 2, 1.2,
         dict(_CLIP_L, **_LLAMA_7B, layers=3, image=336, text=128, proj=768),
         summary="LLaVA-NeXT-7B: 1x2 anyres grid (1752 image tokens) + 128 text, Llama 2 layers"),
    Spec("mllama_11b", _mllama, _mllama_inputs, 2, 1.5,
         dict(vd=1280, vheads=16, layers=2, image=560, patch=14, tiles=4, td=4096, theads=32, tkv=8, tffn=14336,
              tlayers=3, text=256, vocab=VOCAB),
         tiny=dict(tiles=2, tlayers=3, theads=4, tkv=2),
         summary="Llama 3.2 11B Vision: 4 tiles @560, vision 2+1 layers, text 3 layers (1 cross-attention)"),
    Spec("idefics_9b", _idefics, _idefics_inputs, 4, 1.5,
         dict(vd=1280, vheads=16, layers=2, image=224, patch=14, td=4096, theads=32, tffn=11008, tlayers=2, text=256,
              vocab=VOCAB, latents=64, pheads=16, phead_dim=96),
         loss=_idefics_loss,
         summary="IDEFICS-9B: ViT-H/14 2 layers, perceiver 64 latents, 2 text layers each with gated cross-attention"),
]


# ----------------------------------------------------------------------------------------------
# Cases

def _build(spec, smoke, device):
    size = dict(TINY, **spec.tiny) if smoke else dict(TINY, **spec.medium)
    dtype = torch.float32 if smoke else torch.bfloat16

    def build():
        torch.manual_seed(0)
        with torch.device(device):
            model = spec.build(size)
        model = model.to(dtype).eval()  # eval: no dropout, so both cases compute the same function
        try:
            model.set_attn_implementation("sdpa")
        except Exception:  # BLIP (v1): no attention interface, its own eager attention
            pass
        inputs = spec.inputs(size, 2 if smoke else spec.batch, torch.Generator().manual_seed(1))
        inputs = {k: v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else
                  v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        return {"model": model, "inputs": inputs, "backend": "reference" if smoke else "auto", "device": device}
    return build


def _loss(spec, out, batch):
    return spec.loss(out, batch) if spec.loss is not None else out.loss


def _step_fn(spec, state, train):
    model, batch = state["model"], state["inputs"]
    if not train:
        def fwd():
            with torch.no_grad():
                model(**batch)
        return fwd
    model.zero_grad(set_to_none=True)
    state.pop("opt", None)  # the previous case's optimizer state goes first
    opt = state["opt"] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        opt.zero_grad(set_to_none=True)
        _loss(spec, model(**batch), batch).backward()
        opt.step()
    return step


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def kernel_share(fn, device, walls=3):
    """(ms in mmfast custom ops, wall ms, calls of them) of one call of fn: device time on CUDA, CPU time on
    the CPU; the wall time is the median of `walls` calls outside the profiler."""
    cuda = torch.device(device).type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    fn()
    _sync(device)
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        _sync(device)
    ours = [e for e in prof.events() if e.name.startswith("mmfast::")]
    # only the outermost mmfast op of a nest: its total includes the inner ones
    ours = [e for e in ours if not any(o is not e and o.time_range.start <= e.time_range.start
                                       and e.time_range.end <= o.time_range.end and o.thread == e.thread
                                       for o in ours)]
    us = sum((e.device_time_total if cuda else e.cpu_time_total) for e in ours)
    times = []
    for _ in range(walls):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return us / 1e3, sorted(times)[len(times) // 2] * 1e3, len(ours)


def _case(spec, train, patched):
    case = Case("mmfast" if patched else "sdpa", None,
                "after mmfast.patch(model)" if patched else
                ("stock model (eager attention: BLIP has no attention interface)" if spec.name.startswith("blip_")
                 else "stock model, attn_implementation='sdpa'"))

    def make(state):
        import mmfast

        model = state["model"]
        mmfast.unpatch(model)
        if patched:
            report = mmfast.patch(model, backend=state["backend"])
            if not report.swapped:
                raise Skip(f"mmfast.patch swapped nothing: {report.message}")
        fn = _step_fn(spec, state, train)
        if patched:
            ours, wall, n = kernel_share(fn, state["device"], walls=1 if state["backend"] == "reference" else 3)
            fallbacks = f"; SDPA fallbacks: {report.fallbacks}" if report.fallbacks else ""
            case.note = (f"after mmfast.patch(model): {len(report.swapped)} modules swapped; {n} mmfast op calls, "
                         f"{100 * ours / wall:.0f}% of the call's time in mmfast kernels{fallbacks}")
        return fn
    case.make = make
    return case


def workloads(mode, device):
    device = torch.device(device)
    smoke = mode == "smoke"
    out = []
    for spec in SPECS:
        build, nbytes = _build(spec, smoke, device), _weight_bytes(spec, smoke)
        for train in (False, True):
            direction = "train" if train else "fwd"
            target = spec.target if train else 1.0
            info = {"model": spec.name, "direction": direction, "batch": 2 if smoke else spec.batch,
                    "dtype": "fp32" if smoke else "bf16", "target_speedup": target,
                    "headline": f"{spec.name} {direction}" in HEADLINE,
                    "summary": f"{spec.summary}, {'forward' if not train else 'forward + backward + AdamW step'}; "
                               f"target: mmfast >= {target:.1f}x sdpa"}
            out.append(Workload(f"{spec.name} {direction}", build, nbytes * (3 if train else 1),
                                info, [_case(spec, train, False), _case(spec, train, True)],
                                baselines={"sdpa": "sdpa"}))
    return out


def _weight_bytes(spec, smoke):
    """Bytes of the model's weights (built on the meta device: no memory, no init time)."""
    size = dict(TINY, **spec.tiny) if smoke else dict(TINY, **spec.medium)
    with torch.device("meta"):
        model = spec.build(size)
    return sum(p.numel() for p in model.parameters()) * (4 if smoke else 2)
