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

- ``idefics-9b`` shape (transformers' Flamingo, converted by ``Flamingo.from_hf``): ViT-H/14 (6 of 32 layers) →
  the perceiver (6 layers, 64 latents, 16 x 96 heads) → LLaMA-7B's width (4 of 32 layers, a gated block before
  the first); the same 2-chunk prompt, each token seeing its most recent image.
- ``openflamingo-3b`` shape: ViT-L/14 (6 of 24 layers) → the perceiver (6 layers, 64 latents) → MPT-1B's width
  as a Llama (2048, 16 heads, MLP 8192, vocab 50280; 4 of 24 layers) with a gated block before every layer;
  the prompt is 2 chunks ``<image> 30 text <|endofchunk|>``. Its baseline is open_flamingo's own model; without open_flamingo installed (it goes in with ``--no-deps``) the
  workloads skip, naming it.

Each model gives three workloads, each with an ``mmfast`` case (converted with ``from_hf`` /
``from_open_flamingo``, backend auto) and the baseline (``hf_sdpa``, ``open_flamingo``): ``prefill`` (bf16 weights, no grad, logits of the last position only: tokens/s =
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


def _flamingo_config(tiny):
    """open_flamingo's factory arguments: an open_clip ViT, a transformers Llama, every how many layers a
    gated block sits (no transformers config: its model is built by _open_flamingo)."""
    if tiny:
        vision = dict(image_size=16, patch_size=4, width=32, layers=2, head_width=16, mlp_ratio=2)
        text = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, max_position_embeddings=64)
    else:  # OpenFlamingo-3B's shape: ViT-L/14 (6 of 24 layers), MPT-1B's width as a Llama (4 of 24 layers)
        vision = dict(image_size=224, patch_size=14, width=1024, layers=6, head_width=64, mlp_ratio=4)
        text = dict(vocab_size=50280, hidden_size=2048, num_hidden_layers=4, num_attention_heads=16,
                    num_key_value_heads=16, intermediate_size=8192, max_position_embeddings=2048)
    vocab = text["vocab_size"]
    return dict(vision=vision, text=text, every=1), dict(image=vision["image_size"], vocab=vocab, images=2,
                                                         media=vocab - 2, eoc=vocab - 1)


def _idefics_config(tiny):
    import transformers

    if tiny:
        vision = dict(embed_dim=16, image_size=8, patch_size=4, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2)
        text = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                    cross_layer_interval=1)
        perceiver = dict(resampler_n_latents=3, resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8)
    else:  # Idefics-9B's widths: ViT-H/14 (6 of 32 layers), LLaMA-7B (4 of 32 layers, a gated block before the 1st)
        vision = dict(embed_dim=1280, image_size=224, patch_size=14, intermediate_size=5120, num_hidden_layers=6,
                      num_attention_heads=16)
        text = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                    num_attention_heads=32, cross_layer_interval=4)
        perceiver = dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16, resampler_head_dim=96)
    vocab = text["vocab_size"]
    # no additional (decoupled) vocabulary rows: transformers' loss breaks with them (it reshapes the logits to
    # vocab_size columns); <image> and <|endofchunk|> are the last two ids instead
    config = transformers.IdeficsConfig(**text, additional_vocab_size=0, alpha_type="float", use_resampler=True,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, vision_config=vision,
                                        perceiver_config=dict(use_resampler=True, **perceiver))
    return config, dict(image=vision["image_size"], vocab=vocab, images=2, media=vocab - 2, eoc=vocab - 1)


def _open_flamingo(tiny, device):
    """open_flamingo's Flamingo as its factory.py builds it (random weights, no downloads), its language model's
    attention SDPA."""
    import open_clip
    import transformers
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    cfg, dims = _flamingo_config(tiny)
    torch.manual_seed(0)
    with torch.device(device):
        clip = open_clip.model.CLIP(embed_dim=16, vision_cfg=cfg["vision"],
                                    text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1))
        clip.visual.output_tokens = True
        lang = transformers.LlamaForCausalLM._from_config(
            transformers.LlamaConfig(**cfg["text"], pad_token_id=0, bos_token_id=1, eos_token_id=2),
            attn_implementation="sdpa")
        extend_instance(lang, FlamingoLMMixin)
        lang.set_decoder_layers_attr_name("model.layers")
        model = Flamingo(clip, lang, dims["eoc"], dims["media"], vis_dim=cfg["vision"]["width"],
                         cross_attn_every_n_layers=cfg["every"])
    return model


def _flamingo_direct(tiny, backend):
    """mmfast's Flamingo of the open_flamingo baseline's shape, built directly (random weights): where
    open_flamingo is missing, our cases still run."""
    from mmfast.models import Flamingo
    from mmfast.models.flamingo import _clip_vit

    cfg, dims = _flamingo_config(tiny)
    v, t = cfg["vision"], cfg["text"]
    vision = dict(_clip_vit(v["image_size"], v["patch_size"], v["width"], v["layers"], v["width"] // v["head_width"],
                            act="gelu"), mlp_dim=v["width"] * v["mlp_ratio"])
    lm = dict(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"],
              num_heads=t["num_attention_heads"], num_kv_heads=t["num_key_value_heads"],
              intermediate_size=t["intermediate_size"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Flamingo(vision, lm, media_token_id=dims["media"], eoc_token_id=dims["eoc"],
                    cross_attn_every_n_layers=cfg["every"], backend=backend)


def _hf_model(kind, tiny, device):
    import transformers

    if "build" in MODELS[kind]:
        return MODELS[kind]["build"](tiny, device)
    config, _ = MODELS[kind]["config"](tiny)
    cls = getattr(transformers, MODELS[kind]["hf_class"])
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, attn_implementation="sdpa")
    return model


def _ours(kind, hf, tiny, backend):
    import mmfast.models as models

    cls = getattr(models, MODELS[kind]["ours"])
    convert = getattr(cls, MODELS[kind].get("convert", "from_hf"))
    if MODELS[kind].get("idefics"):  # the <image> id is the tokenizer's, not in the config
        return convert(hf, media_token_id=MODELS[kind]["config"](tiny)[1]["media"], backend=backend)
    return convert(hf, backend=backend)


def _freeze_hf(kind, model, tiny):
    """The bridge's stage on the transformers model: what `set_stage` trains on ours."""
    train = MODELS[kind]["hf_trainable"]
    if callable(train):
        train = train(tiny)
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(prefix) or f".{prefix}" in name for prefix in train))


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
    # the baseline is open_flamingo's own model (transformers has no Flamingo: Idefics differs, see
    # mmfast/models/flamingo.py); where open_flamingo is not installed its cases skip, naming it
    # transformers' Flamingo: Idefics (v1), the model the issue's "vs Hugging Face" means for Flamingo
    "idefics-9b": dict(config=_idefics_config, hf_class="IdeficsForVisionText2Text", ours="Flamingo", stage="bridge",
                       text=30, idefics=True, hf_trainable=("model.perceiver_resampler.", "model.gated_cross_attn_layers.")),
    "openflamingo-3b": dict(config=_flamingo_config, build=_open_flamingo, baseline="open_flamingo",
                            ours="Flamingo", convert="from_open_flamingo", stage="bridge", text=30,
                            hf_trainable=("perceiver.", "gated_cross_attn_layer"), direct=_flamingo_direct),
}


# ---- inputs and cases ---------------------------------------------------------------------------------------

def _inputs(kind, tiny, batch, device):
    """The forward's keywords (Hugging Face's names, which ours take too): random pixels and a prompt per row,
    the image placeholders first, then random text (no padding; no zeros among the pixels)."""
    _, dims = MODELS[kind]["config"](tiny)
    text = 3 if tiny else MODELS[kind]["text"]
    g = torch.Generator(device=device).manual_seed(0)
    if "images" in dims:  # Flamingo: chunks <image> text <|endofchunk|>, one image each (open_flamingo's names)
        n, size = dims["images"], dims["image"]
        ids = torch.randint(3, min(dims["media"], dims["vocab"]), (batch, n * (text + 2)), generator=g, device=device)
        ids[:, ::text + 2], ids[:, text + 1::text + 2] = dims["media"], dims["eoc"]
        if MODELS[kind].get("idefics"):  # HF's keywords; each token sees its most recent image, as the processor
            recent = (ids == dims["media"]).cumsum(-1) - 1
            iam = (recent[..., None] == torch.arange(n, device=device)).long()
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_attention_mask": iam,
                    "pixel_values": torch.randn(batch, n, 3, size, size, generator=g, device=device)}
        # the last row left-padded by one token: transformers 5's generate drops an all-ones mask, which
        # open_flamingo's forward requires
        ids[-1] = torch.cat([ids.new_zeros(1), ids[-1, :-1]])
        mask = torch.ones_like(ids)
        mask[-1, 0] = 0
        return {"vision_x": torch.randn(batch, n, 1, 3, size, size, generator=g, device=device), "lang_x": ids,
                "attention_mask": mask}
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
    if ours and state["missing"]:  # the baseline's package is missing: ours built directly, same shape
        with torch.device(device):
            model = MODELS[kind]["direct"](state["tiny"], state["backend"])
    else:
        model = _hf_model(kind, state["tiny"], device)
        if ours:
            model = _ours(kind, model, state["tiny"], state["backend"])
    if dtype is not None:
        model = model.cast(dtype) if hasattr(model, "cast") else model.to(dtype)
        if not ours and hasattr(model, "qformer"):  # transformers keeps BLIP-2's Q-Former in fp32
            model.qformer.float()
            model.query_tokens.data = model.query_tokens.data.float()
    state["live"] = model
    return model


def _baseline(kind):
    """(case name, note) of the model's baseline."""
    if MODELS[kind].get("baseline") == "open_flamingo":
        return "open_flamingo", "open_flamingo 2.0.1's Flamingo (its LM: transformers Llama, SDPA)"
    return "hf_sdpa", f"transformers {MODELS[kind]['hf_class']}, attn_implementation='sdpa'"


def _case(kind, phase, ours):
    name, note = ("mmfast", f"mmfast.models.{MODELS[kind]['ours']}.{MODELS[kind].get('convert', 'from_hf')}") \
        if ours else _baseline(kind)
    case = Case(name, None, note)

    def make(state):
        device, inputs = state["device"], state["inputs"]
        if state["missing"] and not (ours and "direct" in MODELS[kind]):
            raise Skip(state["missing"])
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
                ids = inputs["input_ids"] if "input_ids" in inputs else inputs["lang_x"]
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
                "inputs": _inputs(kind, tiny, batch, device), "missing": _missing(kind)}

    _, dims = MODELS[kind]["config"](tiny)
    text = 3 if tiny else MODELS[kind]["text"]
    prompt = dims["images"] * (text + 2) if "images" in dims else dims["image_tokens"] + text
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
            "summary": f"{kind}{' tiny' if tiny else ''}: {what}; vs {_baseline(kind)[0]}; target >= {target}x"}
    cases = [_case(kind, phase, True), _case(kind, phase, False)]
    # the least traffic: every weight read once per forward (bf16 on CUDA, fp32 elsewhere), once per new token
    # when generating; training also writes the trainable weights' gradients and AdamW's state, ignored here
    weight_bytes = _param_count(kind, tiny) * (2 if device.type == "cuda" else 4)
    nbytes = weight_bytes * (new_tokens if phase == "generate" else 1)
    label = "open_flamingo" if MODELS[kind].get("baseline") == "open_flamingo" else "hf"
    return Workload(f"{kind}{' tiny' if tiny else ''} {phase}", build, nbytes, info, cases,
                    baselines={label: _baseline(kind)[0]})


def _missing(kind):
    """Why the model's baseline (and the conversion from it) cannot be built here, or None."""
    import importlib

    for name in ("open_flamingo", "open_clip", "einops_exts") if MODELS[kind].get("baseline") else ("transformers",):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            return f"{name} not installed ({type(exc).__name__}: {exc}); open_flamingo goes in with --no-deps" \
                if name != "transformers" else f"transformers not installed ({exc})"
    return None


def _param_count(kind, tiny):
    """The model's parameters (the least traffic's basis); an estimate from the widths where the baseline's
    package is missing."""
    if _missing(kind) is None:
        return sum(p.numel() for p in _hf_model(kind, tiny, torch.device("meta")).parameters())
    cfg, _ = MODELS[kind]["config"](tiny)
    t = cfg["text"]
    return t["num_hidden_layers"] * (4 * t["hidden_size"] ** 2 + 3 * t["hidden_size"] * t["intermediate_size"]) \
        + 2 * t["vocab_size"] * t["hidden_size"]


def workloads(mode, device):
    device = torch.device(device)
    tiny = mode == "smoke" or device.type != "cuda"
    backend = "reference" if mode == "smoke" else "auto"
    return [_workload(kind, phase, mode, device, tiny, backend)
            for kind in MODELS for phase in ("prefill", "generate", "train")]
