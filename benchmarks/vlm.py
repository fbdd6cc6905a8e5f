"""VLM suite (issue 15): the bridge models of part 2 — prefill, decode and the bridge's training step — as
mmfast's models against the same weights in Hugging Face's (SDPA attention).

Workloads (CUDA, quick and full), real widths with layers reduced so that a model and its baseline fit one
card and a few minutes:
- ``llava-1.5-7b`` shape: CLIP ViT-L/14@336 (1024 wide, 6 of 24 layers; LLaVA reads layer −2) → MLP
  projector → Llama-7B's width (4096, 32 heads, MLP 11008, vocab 32064; 4 of 32 layers); the prompt is
  576 visual tokens + 64 text tokens per row.
- ``llama-3.2-11b-vision`` shape: the vision encoder at 1280 wide on 4 tiles of 560px (4 local + 2 gated global
  of its 32 + 8 layers) → Llama 3.1 8B's width (4096, 32 / 8 heads, MLP 14336, vocab 128256; 5 of its 40
  layers, the 4th a gated cross-attention layer); the prompt is the ``<|image|>`` token + 64 text tokens, every
  row seeing the image's 4 x 1601 tokens.
- ``blip2-opt-2.7b`` shape: ViT-g/14 (1408 wide, 16 heads, 6 of 39 layers) → the Q-Former (768 wide,
  12 layers, 32 queries, fp32 as transformers keeps it) → OPT-2.7B's width (2560, 32 heads, vocab 50272;
  8 of 32 layers); the prompt is 32 query tokens + 32 text tokens.

Each model gives three workloads, each with an ``mmfast`` case (converted with ``from_hf``, backend auto) and
the ``hf_sdpa`` baseline: ``prefill`` (bf16 weights, no grad, logits of the last position only: tokens/s =
batch x prompt / ms), ``generate`` (bf16, greedy, 32 new tokens after the prompt, prefill included, EOS never
ends a row: decode tokens/s ≈ batch x 32 / (generate ms − prefill ms)), and ``train`` (the bridge's
training step: bf16 autocast over fp32 weights, forward + backward + fused AdamW over the trainable parameters
only, LLaVA stage 1 (projector), BLIP-2 stage 2 (Q-Former, queries, projection), Llama 3.2 Vision's adapter
(cross-attention layers, projector), the frozen LM carrying
the gradient through). Targets (for the report, not for tests): ≥ 1.3x Hugging Face per training step, ≥ 1.2x
on prefill, decode not slower.

GB/s counts each weight read once per forward (per new token when generating): the floor of a
memory-bound decode. Smoke (any device, seconds): tiny configs of the same models on the reference backend, fp32, batch 2.
"""
import gc

import torch

from .common import Case, Skip, Workload

TARGETS = {"train": 1.3, "prefill": 1.2, "generate": 1.0}
NEW_TOKENS = {"smoke": 3, "quick": 32, "full": 32}


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the models: a transformers config per size, the mmfast class that converts it ---------------------------

def _llava_config(tiny):
    import transformers

    if tiny:
        vision = dict(image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64)
        text = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
    else:
        vision = dict(image_size=336, patch_size=14, hidden_size=1024, num_hidden_layers=6, num_attention_heads=16,
                      intermediate_size=4096, projection_dim=768)
        text = dict(vocab_size=32064, hidden_size=4096, num_hidden_layers=4, num_attention_heads=32,
                    num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=4096)
    vocab = text["vocab_size"]
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**vision),
        text_config=transformers.LlamaConfig(**text, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_id=vocab - 1, projector_hidden_act="gelu")
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    return config, dict(image=vision["image_size"], image_tokens=tokens, vocab=vocab)


def _blip2_config(tiny):
    import transformers

    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                      patch_size=8)
        qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       encoder_hidden_size=32, vocab_size=100)
        text = dict(vocab_size=100, hidden_size=48, num_hidden_layers=2, ffn_dim=96, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=48)
        queries = 4
    else:
        vision = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=6, num_attention_heads=16,
                      image_size=224, patch_size=14)
        qformer = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       encoder_hidden_size=1408)
        text = dict(vocab_size=50272, hidden_size=2560, num_hidden_layers=8, ffn_dim=10240, num_attention_heads=32,
                    max_position_embeddings=2048, word_embed_proj_dim=2560)
        queries = 32
    vocab = text["vocab_size"]
    config = transformers.Blip2Config(
        vision_config=vision, qformer_config=qformer,
        text_config=transformers.OPTConfig(**text, pad_token_id=1, bos_token_id=2, eos_token_id=2),
        num_query_tokens=queries, image_token_id=vocab - 1)
    return config, dict(image=vision["image_size"], image_tokens=queries, vocab=vocab)


def _mllama_config(tiny):
    import transformers

    if tiny:
        vision = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                      intermediate_size=64, vision_output_dim=64, image_size=16, patch_size=8, max_num_tiles=2,
                      intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
        text = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, cross_attention_layers=[1], max_position_embeddings=64)
    else:  # Llama 3.2 11B Vision's widths; 4 + 2 of its 32 + 8 vision layers, 5 of its 40 text layers
        vision = dict(hidden_size=1280, num_hidden_layers=4, num_global_layers=2, attention_heads=16,
                      intermediate_size=5120, vision_output_dim=3840, image_size=560, patch_size=14, max_num_tiles=4,
                      intermediate_layers_indices=[1, 3])
        text = dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=5, num_attention_heads=32,
                    num_key_value_heads=8, intermediate_size=14336, cross_attention_layers=[3],
                    max_position_embeddings=8192)
    vocab = text["vocab_size"]
    config = transformers.MllamaConfig(vision_config=vision, text_config=dict(text, pad_token_id=0, bos_token_id=1,
                                                                             eos_token_id=2),
                                       image_token_index=vocab - 1)
    tokens = vision["max_num_tiles"] * ((vision["image_size"] // vision["patch_size"]) ** 2 + 1)
    # one image token in the prompt (its keys are the tiles' tokens, through cross-attention)
    return config, dict(image=vision["image_size"], image_tokens=1, vocab=vocab, tiles=vision["max_num_tiles"],
                        vision_tokens=tokens, cross_layers=text["cross_attention_layers"])


def _hf_model(kind, tiny, device):
    import transformers

    config, _ = MODELS[kind]["config"](tiny)
    cls = getattr(transformers, MODELS[kind]["hf_class"])
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, attn_implementation="sdpa")
    return model


def _ours(kind, hf, backend):
    import mmfast.models as models

    return getattr(models, MODELS[kind]["ours"]).from_hf(hf, backend=backend)


def _freeze_hf(kind, model, tiny):
    """The bridge's stage on the transformers model: what `set_stage` trains on ours."""
    train = MODELS[kind]["hf_trainable"]
    if callable(train):
        train = train(tiny)
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(prefix) for prefix in train))


MODELS = {
    "llava-1.5-7b": dict(config=_llava_config, hf_class="LlavaForConditionalGeneration", ours="Llava",
                         stage=1, hf_trainable=("model.multi_modal_projector.",), text=64),
    "blip2-opt-2.7b": dict(config=_blip2_config, hf_class="Blip2ForConditionalGeneration", ours="Blip2",
                           stage="stage2", hf_trainable=("qformer.", "query_tokens", "language_projection."),
                           text=32),
    "llama-3.2-11b-vision": dict(
        config=_mllama_config, hf_class="MllamaForConditionalGeneration", ours="Mllama", stage="bridge", text=64,
        hf_trainable=lambda tiny: ("model.multi_modal_projector.",) + tuple(
            f"model.language_model.layers.{i}." for i in _mllama_config(tiny)[1]["cross_layers"])),
}


# ---- inputs and cases ---------------------------------------------------------------------------------------

def _inputs(kind, tiny, batch, device):
    """The forward's keywords (Hugging Face's names, which ours take too): random pixels and a prompt per row,
    the image placeholders first, then random text (no padding; no zeros among the pixels)."""
    _, dims = MODELS[kind]["config"](tiny)
    text = 3 if tiny else MODELS[kind]["text"]
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(3, dims["vocab"] - 1, (batch, dims["image_tokens"] + text), generator=g, device=device)
    ids[:, :dims["image_tokens"]] = dims["vocab"] - 1
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    size = (dims["image"], dims["image"])
    if "tiles" in dims:  # Mllama: one image of the widest arrangement (every tile used), seen by every row
        T = dims["tiles"]
        inputs.update(pixel_values=torch.randn(batch, 1, T, 3, *size, generator=g, device=device),
                      aspect_ratio_ids=torch.ones(batch, 1, dtype=torch.long, device=device) * _widest_id(T),
                      aspect_ratio_mask=torch.ones(batch, 1, T, dtype=torch.long, device=device),
                      cross_attention_mask=torch.ones(batch, ids.shape[1], 1, T, dtype=torch.long, device=device))
    else:
        inputs["pixel_values"] = torch.randn(batch, 3, *size, generator=g, device=device)
    return inputs


def _widest_id(tiles):
    """The aspect ratio id (1-based, HF's processor order) of the 1 x `tiles` arrangement."""
    from mmfast.models.mllama import supported_aspect_ratios

    return 1 + [tuple(r) for r in supported_aspect_ratios(tiles)].index((1, tiles))


def _forward(model, inputs, **kw):
    return model(**inputs, **kw)


def _generate(model, inputs, ours, new_tokens):
    kw = dict(max_new_tokens=new_tokens, do_sample=False)
    if ours:  # eos -1 matches no token: every row decodes all new tokens, as min_new_tokens makes HF's
        return model.generate(**inputs, eos_token_id=-1, **kw)
    return model.generate(**inputs, min_new_tokens=new_tokens, **kw)


def _build(kind, ours, state, dtype):
    device = state["device"]
    state["live"] = None
    _free(device)
    model = _hf_model(kind, state["tiny"], device)
    if ours:
        model = _ours(kind, model, state["backend"])
    if dtype is not None:
        model = model.cast(dtype) if hasattr(model, "cast") else model.to(dtype)
        if not ours and hasattr(model, "qformer"):  # transformers keeps BLIP-2's Q-Former in fp32
            model.qformer.float()
            model.query_tokens.data = model.query_tokens.data.float()
    state["live"] = model
    return model


def _case(kind, phase, ours):
    name = "mmfast" if ours else "hf_sdpa"
    note = (f"mmfast.models.{MODELS[kind]['ours']}.from_hf" if ours else
            f"transformers {MODELS[kind]['hf_class']}, attn_implementation='sdpa'")
    case = Case(name, None, note)

    def make(state):
        device, inputs = state["device"], state["inputs"]
        bf16 = device.type == "cuda"
        try:
            if phase == "train":
                model = _build(kind, ours, state, None).train()
                if ours:
                    model.set_stage(MODELS[kind]["stage"])
                else:
                    _freeze_hf(kind, model, state["tiny"])
                params = [p for p in model.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(params, lr=1e-6, fused=bf16)
                ids = inputs["input_ids"]
                labels = ids.masked_fill(ids == ids[0, 0], -100)  # the image placeholders

                def fn():
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        loss = _forward(model, inputs, labels=labels).loss
                    loss.backward()
                    opt.step()
            else:
                model = _build(kind, ours, state, torch.bfloat16 if bf16 else None).eval()
                run = {k: v.to(torch.bfloat16) if bf16 and v.is_floating_point() else v for k, v in inputs.items()}

                if phase == "prefill":
                    import inspect

                    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters \
                        else {}

                    def fn():
                        with torch.no_grad():
                            _forward(model, run, **keep)
                else:
                    def fn():
                        _generate(model, run, ours, state["new_tokens"])
            fn()  # compiles, allocates AdamW's moments: the timed calls are the steady state
        except torch.cuda.OutOfMemoryError:
            state["live"] = None
            _free(device)
            raise Skip(f"OOM ({kind} {phase})") from None
        return fn

    case.make = make
    return case


def _workload(kind, phase, mode, device, tiny, backend):
    batch = 2 if tiny else 8
    new_tokens = NEW_TOKENS[mode]

    def build():
        return {"device": device, "tiny": tiny, "backend": backend, "live": None, "new_tokens": new_tokens,
                "inputs": _inputs(kind, tiny, batch, device)}

    _, dims = MODELS[kind]["config"](tiny)
    prompt = dims["image_tokens"] + (3 if tiny else MODELS[kind]["text"])
    if "vision_tokens" in dims:
        prompt_note = f" (+ {dims['vision_tokens']} vision tokens per image through cross-attention)"
    else:
        prompt_note = ""
    what = {"prefill": f"prefill of {batch} x {prompt} tokens{prompt_note} (tokens/s = {batch * prompt}000 / ms)",
            "generate": f"greedy generation of {new_tokens} tokens after a {prompt}-token prompt, batch {batch}, "
                        "prefill included",
            "train": f"bridge training step (stage {MODELS[kind]['stage']}), batch {batch} x {prompt} tokens"}[phase]
    target = TARGETS[phase]
    info = {"model": kind if not tiny else f"{kind} (tiny)", "phase": phase, "batch": batch, "prompt": prompt,
            "target_speedup": target,
            # LLaVA-1.5's bridge step is the headline: the issue's first target, one model build per case
            "headline": kind == "llava-1.5-7b" and phase == "train",
            "summary": f"{kind}{' tiny' if tiny else ''}: {what}; vs hf (SDPA); target >= {target}x"}
    cases = [_case(kind, phase, True), _case(kind, phase, False)]
    # the least traffic: every weight read once per forward (bf16 on CUDA, fp32 elsewhere), once per new token
    # when generating; training also writes the trainable weights' gradients and AdamW's state, ignored here
    weight_bytes = _param_count(kind, tiny) * (2 if device.type == "cuda" else 4)
    nbytes = weight_bytes * (new_tokens if phase == "generate" else 1)
    return Workload(f"{kind}{' tiny' if tiny else ''} {phase}", build, nbytes, info, cases,
                    baselines={"hf": "hf_sdpa"})


def _param_count(kind, tiny):
    return sum(p.numel() for p in _hf_model(kind, tiny, torch.device("meta")).parameters())


def workloads(mode, device):
    device = torch.device(device)
    tiny = mode == "smoke" or device.type != "cuda"
    backend = "reference" if mode == "smoke" else "auto"
    return [_workload(kind, phase, mode, device, tiny, backend)
            for kind in MODELS for phase in ("prefill", "generate", "train")]
