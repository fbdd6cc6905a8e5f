"""BertModel / BertLMHead against Hugging Face's BlipText (the same post-norm BERT layers), and the KV cache."""
import copy

import pytest
import torch
from optional_deps import optional_import, requires

from mmfast.nn.bert import BertLMHead, BertModel, KVCache, bert_state_dict_from_hf
from numerics import assert_close_by_rule, generator

blip_text = optional_import("transformers.models.blip.modeling_blip_text")


def _close(got, ref, yardstick, **kwargs):
    """tests/numerics.py's rule with a floor of 1e-6 of the reference's magnitude (one fp32 rounding of a
    large value, e.g. a loss or a summed gradient, exceeds the absolute 1e-6)."""
    floor = 1e-6 * max(1.0, ref.detach().abs().max().item())
    return assert_close_by_rule(got, ref, yardstick, floor=floor, **kwargs)

V, E, H, L, LI, EI = 50, 32, 2, 7, 5, 24


def _hf_config():
    return blip_text.BlipTextConfig(vocab_size=V, hidden_size=E, encoder_hidden_size=EI, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=H, max_position_embeddings=32,
                                    bos_token_id=3, eos_token_id=2, pad_token_id=0, sep_token_id=4)


def _ours(hf_bert, head=None, backend="reference"):
    model = BertModel(V, E, 2, H, 64, max_positions=32, cross_attention_dim=EI, pooler=hf_bert.pooler is not None,
                      backend=backend)
    sd = hf_bert.state_dict() if head is None else {**{"bert." + k: v for k, v in hf_bert.state_dict().items()},
                                                    **{"cls." + k: v for k, v in head.state_dict().items()}}
    body, head_sd = bert_state_dict_from_hf(sd, "" if head is None else "bert.", None if head is None else "cls.")
    model.load_state_dict(body, strict=True)
    if head is None:
        return model, None
    lm = BertLMHead(E, V, tie_to=model.embeddings.word_embeddings)
    lm.load_state_dict(head_sd, strict=True)
    return model, lm


def _inputs():
    g = generator()
    ids = torch.randint(5, V, (3, L), generator=g)
    mask = torch.ones(3, L, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    image = torch.randn(3, LI, EI, generator=g)
    return ids, mask, image


@requires("transformers")
@pytest.mark.parametrize("role", ["encoder", "image_grounded", "decoder"])
def test_matches_hf_blip_text(role):
    torch.manual_seed(0)
    hf = blip_text.BlipTextModel(_hf_config(), add_pooling_layer=True).eval()
    ours, _ = _ours(hf)
    ids, mask, image = _inputs()
    kw = {} if role == "encoder" else {"encoder_hidden_states": image}
    hf_kw = dict(kw, is_decoder=role == "decoder")

    def run_hf(model, dtype):
        return model.to(dtype)(input_ids=ids, attention_mask=mask,
                               **{k: v.to(dtype) if torch.is_tensor(v) else v for k, v in hf_kw.items()})

    ref64 = run_hf(copy.deepcopy(hf), torch.float64)
    ref32 = run_hf(hf, torch.float32)
    image.requires_grad_(True)
    got = ours(ids, mask, causal=role == "decoder", **kw)
    keep = mask.bool()  # padded query rows are outside the contract (HF sees them through its own mask)
    _close(got.last_hidden_state[keep], ref64.last_hidden_state[keep], ref32.last_hidden_state[keep],
                         what=f"{role} hidden")
    _close(got.pooler_output, ref64.pooler_output, ref32.pooler_output, what=f"{role} pooler")


@requires("transformers")
def test_lm_head_and_gradients_match_hf():
    torch.manual_seed(0)
    hf = blip_text.BlipTextLMHeadModel(_hf_config()).eval()
    ours, head = _ours(hf.bert, hf.cls)
    ids, mask, image = _inputs()
    image64 = image.double().requires_grad_(True)
    hf64 = copy.deepcopy(hf).double()
    out64 = hf64(input_ids=ids, attention_mask=mask, encoder_hidden_states=image64).logits
    image32 = image.clone().requires_grad_(True)
    out32 = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=image32).logits
    imageg = image.clone().requires_grad_(True)
    got = head(ours(ids, mask, encoder_hidden_states=imageg, causal=True).last_hidden_state)
    keep = mask.bool()
    _close(got[keep], out64[keep], out32[keep], what="logits")
    w = torch.randn(got.shape, generator=generator()) * keep[..., None]
    for out, x in ((out64, image64), (out32, image32), (got, imageg)):
        (out * w.to(out.dtype)).sum().backward()
    _close(imageg.grad, image64.grad, image32.grad, factor=3.0, what="d image")
    hf_w = dict(hf.named_parameters())
    _close(ours.layers[0].fc1.weight.grad, dict(hf64.named_parameters())[
        "bert.encoder.layer.0.intermediate.dense.weight"].grad, hf_w["bert.encoder.layer.0.intermediate.dense.weight"].grad,
        factor=3.0, what="d fc1")


def test_kv_cache_steps_equal_full_pass():
    torch.manual_seed(0)
    model = BertModel(V, E, 2, H, 64, max_positions=32, cross_attention_dim=EI, backend="reference")
    ids, _, image = _inputs()
    full = model(ids, encoder_hidden_states=image, causal=True).last_hidden_state
    cache = KVCache()
    steps = [model(ids[:, :3], encoder_hidden_states=image, causal=True, cache=cache).last_hidden_state]
    for t in range(3, L):
        steps.append(model(ids[:, t:t + 1], encoder_hidden_states=image, causal=True, cache=cache).last_hidden_state)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == L and len(cache.cross_kv) == 2


def test_kv_cache_reorder_follows_the_batch():
    torch.manual_seed(0)
    model = BertModel(V, E, 1, H, 64, backend="reference")
    ids, _, _ = _inputs()
    cache = KVCache()
    model(ids[:, :4], causal=True, cache=cache)
    order = torch.tensor([2, 0, 0])
    cache.reorder(order)
    step = model(ids[order, 4:5], causal=True, cache=cache).last_hidden_state
    full = model(ids[order, :5], causal=True).last_hidden_state[:, -1:]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [dict(vocab_size=0), dict(cross_attention_from=5), dict(activation="swish"),
                                 dict(pad_token_id=99)], ids=lambda d: next(iter(d)))
def test_constructor_validates(bad):
    args = dict(vocab_size=V, hidden_size=E, num_layers=2, num_heads=H)
    with pytest.raises(ValueError, match=next(iter(bad))):
        BertModel(**{**args, **bad})


def test_forward_validates():
    model = BertModel(V, E, 1, H, backend="reference")
    ids = torch.randint(0, V, (2, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, torch.ones(2, 5))
    with pytest.raises(ValueError, match="mode"):
        model(ids, mode="decoder")
    with pytest.raises(ValueError, match="encoder_embeds"):
        model(ids, mode="fusion")
