"""DecoderLM (Llama / OPT flavours) against transformers' LlamaForCausalLM and OPTForCausalLM: logits on
right- and left-padded batches, the loss and its gradients, greedy / beam generation over the KV cache,
Llama 3's RoPE scaling; one model through the Triton interpreter."""
import copy

import pytest
import torch
from optional_deps import optional_import, requires

from mmfast.nn.decoder import PRESETS, DecoderLM, RMSNorm
from mmfast.nn.rope import position_ids_from_mask, rope_inv_freq
from hf_configs import hf_rope_kwargs
from numerics import assert_close_by_rule, assert_same_greedy_tokens, generator, randomise_norms_

transformers = optional_import("transformers")
V, E, LAYERS, H, HKV, L = 97, 64, 2, 4, 2, 9
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          # wavelengths 2π·10000^(2i/16) fall on all three sides of 64/4 and 64/1: every branch runs
          "original_max_position_embeddings": 64}
FLAVOURS = ["llama", "llama3", "opt"]


def _hf(flavour):
    torch.manual_seed(generator().initial_seed() % 2**31)
    if flavour == "opt":
        config = transformers.OPTConfig(vocab_size=V, hidden_size=E, num_hidden_layers=LAYERS, num_attention_heads=H,
                                        ffn_dim=2 * E, max_position_embeddings=64, word_embed_proj_dim=E,
                                        pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0)
        model = transformers.OPTForCausalLM(config).eval()
    else:
        rope = {"rope_type": "default", "rope_theta": 1e4} if flavour == "llama" else {**LLAMA3, "rope_theta": 1e4}
        # biases (Llama's attention_bias / mlp_bias) on the llama3 flavour only: both layouts are covered
        config = transformers.LlamaConfig(vocab_size=V, hidden_size=E, num_hidden_layers=LAYERS,
                                          num_attention_heads=H, num_key_value_heads=HKV, intermediate_size=2 * E,
                                          max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                                          eos_token_id=2, attention_bias=flavour == "llama3",
                                          mlp_bias=flavour == "llama3",
                                          **hf_rope_kwargs(transformers.LlamaConfig, rope))
        model = transformers.LlamaForCausalLM(config).eval()
    return randomise_norms_(model)


def _batch(padding):
    ids = torch.randint(3, V, (3, L), generator=generator())
    mask = torch.ones(3, L, dtype=torch.long)
    if padding == "left":
        mask[1, :3], mask[2, :5] = 0, 0
    else:
        mask[1, 6:], mask[2, 4:] = 0, 0
    return ids, mask


def _hf_positions(mask):
    # what HF's generate passes; its plain forward would use the column index on left-padded rows
    return (mask.cumsum(-1) - 1).clamp_min(0)


@requires("transformers")
def test_rope_inv_freq_equals_transformers():
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    config = transformers.LlamaConfig(hidden_size=E, num_attention_heads=H, max_position_embeddings=128,
                                      **hf_rope_kwargs(transformers.LlamaConfig, {**LLAMA3, "rope_theta": 500000.0}))
    ref, _ = _compute_llama3_parameters(config, torch.device("cpu"))   # 4.5x: device is required
    got = rope_inv_freq(E // H, 500000.0, LLAMA3)
    assert torch.equal(got, ref)
    assert not torch.equal(got, rope_inv_freq(E // H, 500000.0))  # the scaling changed something


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("flavour", FLAVOURS)
@requires("transformers")
def test_logits_loss_and_grads_match_hf(flavour, padding):
    hf = _hf(flavour)
    ours = DecoderLM.from_hf(hf, backend="reference")
    ids, mask = _batch(padding)
    labels = ids.masked_fill(mask == 0, -100)
    # nor the first real token of a left-padded row: it is predicted from a pad position, whose output
    # differs (pad rows see no key here; HF's fill them otherwise)
    labels[:, 1:].masked_fill_(mask[:, :-1] == 0, -100)
    keep = mask.bool()

    def run(model, **kw):
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels, **kw)
        out.loss.backward()
        return out.logits[keep], out.loss, model.lm_head.weight.grad.clone(), model.get_input_embeddings().weight.grad

    ref64 = copy.deepcopy(hf).double()
    hf_kw = {"position_ids": _hf_positions(mask)} if flavour != "opt" else {}
    ours.get_input_embeddings = lambda: ours.embed_tokens
    got, ref, yard = run(ours), run(ref64, **hf_kw), run(hf, **hf_kw)
    for name, a, r, y in zip(("logits", "loss", "lm_head grad", "embedding grad"), got, ref, yard):
        floor = 1e-6 * max(1.0, r.abs().max().item())
        assert_close_by_rule(a, r, y, factor=2.0 if name in ("logits", "loss") else 3.0, floor=floor,
                             what=f"{flavour} {padding} {name}")


@pytest.mark.parametrize("flavour", FLAVOURS)
@requires("transformers")
def test_padding_and_cache_do_not_change_real_tokens(flavour):
    """A left-padded row's logits equal those of the row alone, and prefill + one-token cached steps
    give the logits of one full forward pass."""
    ours = DecoderLM.from_hf(_hf(flavour), backend="reference")
    ids, mask = _batch("left")
    full = ours(ids, mask).logits
    alone = ours(ids[2:, 5:]).logits
    torch.testing.assert_close(full[2, 5:], alone[0], rtol=1e-5, atol=1e-5)
    out = ours(ids[:, :5], mask[:, :5], use_cache=True)
    steps = [out.logits]
    for t in range(5, L):
        steps.append(ours(ids[:, t:t + 1], mask[:, :t + 1], cache=out.cache).logits)
    assert out.cache.length == L
    torch.testing.assert_close(torch.cat(steps, 1)[mask.bool()], full[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
@pytest.mark.parametrize("flavour", FLAVOURS)
@requires("transformers")
def test_generate_equals_hf_left_padded(flavour, num_beams):
    hf = _hf(flavour)
    ours = DecoderLM.from_hf(hf, backend="reference")
    ids, mask = _batch("left")
    kw = dict(max_new_tokens=7, num_beams=num_beams, do_sample=False)
    # an EOS that row 0 emits mid-way (greedy), so finished rows and their padding are exercised too
    # (probed without any EOS: eos_token_id=-1 matches no token)
    eos = int(ours.generate(ids, mask, max_new_tokens=3, eos_token_id=-1)[0, -1])
    pad = 0 if eos else 1
    expected = hf.generate(ids, attention_mask=mask, eos_token_id=eos, pad_token_id=pad, **kw)
    got = ours.generate(ids, mask, eos_token_id=eos, pad_token_id=pad, **kw)
    if num_beams > 1:
        assert torch.equal(got, expected), f"{got}\n{expected}"
    else:
        def next_logits(prefix):
            full = torch.cat([mask, torch.ones_like(prefix[:, L:])], 1)
            extra = {} if flavour == "opt" else {"position_ids": _hf_positions(full)}
            with torch.no_grad():
                return hf(prefix, attention_mask=full, **extra).logits[:, -1]
        assert_same_greedy_tokens(got, expected, next_logits)
    if num_beams == 1 and torch.equal(got, expected):
        assert (got[0, L + 3:] == pad).all()  # row 0 finished by step 3 and was padded


@pytest.mark.parametrize("flavour", ["llama", "opt"])
@requires("transformers")
def test_from_hf_body_with_a_separate_head(flavour):
    """LLaVA / BLIP-2 hold the bare LlamaModel / OPTModel as `language_model` and the head beside it."""
    hf = _hf(flavour)
    whole = DecoderLM.from_hf(hf, backend="reference")
    parts = DecoderLM.from_hf(hf.model, lm_head=hf.lm_head, backend="reference")
    assert parts.state_dict().keys() == whole.state_dict().keys()
    assert all(torch.equal(v, parts.state_dict()[k]) for k, v in whole.state_dict().items())
    assert (parts.lm_head.weight is parts.embed_tokens.weight) == (flavour == "opt")
    with pytest.raises(ValueError, match="lm_head"):
        DecoderLM.from_hf(hf.model)


@requires("transformers")
def test_hidden_states_follow_hf():
    """HF's tuple: the embeddings, each layer's output, the last one after the final norm."""
    hf = _hf("llama")
    ids, _ = _batch("right")
    got = DecoderLM.from_hf(hf, backend="reference")(ids, output_hidden_states=True).hidden_states
    expected = hf(ids, output_hidden_states=True).hidden_states
    assert len(got) == len(expected) == LAYERS + 1
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layer_hook_runs_before_each_layer():
    model = DecoderLM.from_preset("tiny-llama", backend="reference")
    ids, mask = _batch("left")
    shift = torch.randn(E, generator=generator())
    got = model(ids, mask, layer_hook=lambda i, x: x + shift if i == 1 else x).logits
    x = model.embed_tokens(ids)
    rotary = model.rotary(position_ids_from_mask(mask, L))
    for i, layer in enumerate(model.layers):
        x = layer(x + shift if i == 1 else x, rotary=rotary, key_padding_mask=mask == 0)
    torch.testing.assert_close(got, model.lm_head(model.norm(x)), rtol=0, atol=0)
    assert not torch.allclose(got, model(ids, mask).logits)


@requires("transformers")
def test_generate_from_inputs_embeds_equals_hf():
    hf = _hf("llama")
    ours = DecoderLM.from_hf(hf, backend="reference")
    ids, mask = _batch("left")
    embeds = ours.embed_tokens(ids).detach()
    expected = hf.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, do_sample=False)
    got = ours.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(got, expected)
    assert torch.equal(got, ours.generate(ids, mask, max_new_tokens=5)[:, L:])


@pytest.mark.parametrize("flavour", ["llama", "opt"])
@requires("transformers")
def test_sampling_equals_hf_from_the_same_seed(flavour):
    """HF's warpers (temperature, top-k, top-p) and one torch.multinomial per step: the same draws."""
    hf = _hf(flavour)
    ours = DecoderLM.from_hf(hf, backend="reference")
    ids, mask = _batch("left")
    kw = dict(do_sample=True, max_new_tokens=6, top_p=0.8, top_k=20, temperature=0.7)
    seed = generator().initial_seed() % 2**31
    torch.manual_seed(seed)
    expected = hf.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(seed)
    assert torch.equal(ours.generate(ids, mask, **kw), expected)


def test_sampling_with_a_vanishing_nucleus_is_greedy():
    ours = DecoderLM.from_preset("tiny-llama", backend="reference", eos_token_id=None)
    ids, mask = _batch("left")
    greedy = ours.generate(ids, mask, max_new_tokens=5)
    sampled = ours.generate(ids, mask, max_new_tokens=5, do_sample=True, top_p=1e-6, generator=generator())
    assert torch.equal(sampled, greedy)
    a = ours.generate(ids, mask, max_new_tokens=5, do_sample=True, generator=torch.Generator().manual_seed(1))
    b = ours.generate(ids, mask, max_new_tokens=5, do_sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, L + 5)


@requires("transformers")
def test_triton_interpreter_matches_reference(block_mask_builds):
    """The attention path through flash_attention's Triton kernels (interpreter on CPU): GQA, causal,
    left padding, a cached decoding step; the padded causal block mask is built once per forward (each
    decoding step too), not by every layer's call."""
    ref = DecoderLM.from_hf(_hf("llama"), backend="reference")
    tri = copy.deepcopy(ref)
    for layer in tri.layers:
        layer.attn.backend = "triton"
    ids, mask = _batch("left")
    keep = mask.bool()
    torch.testing.assert_close(tri(ids, mask).logits[keep], ref(ids, mask).logits[keep], rtol=1e-5, atol=1e-5)
    assert block_mask_builds == {"per forward": 1, "per layer": 0}  # the reference backend builds none
    assert torch.equal(tri.generate(ids, mask, max_new_tokens=2), ref.generate(ids, mask, max_new_tokens=2))
    assert block_mask_builds == {"per forward": 3, "per layer": 0}  # the prompt and one cached step


@requires("transformers")
def test_rmsnorm_rounds_like_llama_in_bf16():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    theirs = LlamaRMSNorm(E, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    ours = RMSNorm(E, 1e-5, dtype=torch.bfloat16)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, E, generator=generator()).to(torch.bfloat16)
    assert torch.equal(ours(x), theirs(x))


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask, 5).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0]]
    assert position_ids_from_mask(mask, 2).tolist() == [[1, 2], [0, 0]]
    assert position_ids_from_mask(None, 2, past_length=3).tolist() == [[3, 4]]


def test_initialisation_follows_transformers():
    model = DecoderLM.from_preset("tiny-opt")
    assert model.lm_head.weight is model.embed_tokens.weight
    assert not model.embed_tokens.weight[model.pad_token_id].any()
    assert model.layers[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert not model.layers[0].attn.qkv.bias.any() and torch.equal(model.norm.weight, torch.ones(E))


@pytest.mark.parametrize("name,billions", [("vicuna-7b", 6.738), ("llama-3.1-8b", 8.030), ("opt-2.7b", 2.652)])
def test_presets_parameter_counts(name, billions):
    model = DecoderLM.from_preset(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=1e-3)
    assert PRESETS[name]["vocab_size"] == model.vocab_size


@pytest.mark.parametrize("make,match", [
    (lambda: DecoderLM(0, E, 1, H), "vocab_size"),
    (lambda: DecoderLM(V, E, 1, H, positions="learned"), "max_positions"),
    (lambda: DecoderLM(V, E, 1, H, norm="batchnorm"), "norm"),
    (lambda: DecoderLM(V, E, 1, H, num_kv_heads=3), "num_kv_heads"),
    (lambda: rope_inv_freq(15), "head_dim"),
    (lambda: rope_inv_freq(16, scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (lambda: rope_inv_freq(16, scaling={"rope_type": "yarn"}), "rope_type"),
    (lambda: DecoderLM.from_hf(torch.nn.Linear(2, 2)), "LlamaForCausalLM"),
], ids=["vocab", "learned-positions", "norm", "gqa-heads", "odd-head-dim", "llama3-keys", "rope-type", "from-hf"])
def test_invalid_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("call,match", [
    (lambda m, ids: m(ids, inputs_embeds=m.embed_tokens(ids)), "exactly one"),
    (lambda m, ids: m(ids, torch.ones(3, L + 1)), "attention_mask"),
    (lambda m, ids: m(ids, labels=ids[:, 1:]), "labels"),
    (lambda m, ids: m.generate(ids, num_beams=2, do_sample=True), "beam sampling"),
    (lambda m, ids: m(torch.randint(0, V, (1, 65))), "max_positions"),
    (lambda m, ids: m.generate(ids, eos_token_id=[]), "eos_token_id"),
], ids=["ids-and-embeds", "mask-shape", "labels-shape", "beam-sampling", "too-long", "no-eos-ids"])
def test_invalid_inputs_raise(call, match):
    model = DecoderLM.from_preset("tiny-opt", backend="reference")
    with pytest.raises(ValueError, match=match):
        call(model, torch.randint(0, V, (3, L)))
