"""Tiny random transformers models (no downloads) and the parity check every integration test uses.

Parity: the stock model in fp64 is the reference; the stock fp32 model's error against it is the
yardstick (tests/numerics.py rule: outputs 2x, gradients 3x); the patched fp32 model must stay within.
"""
import collections
import contextlib
import copy
import inspect

import pytest
import torch

import mmfast
import mmfast.kernels
from numerics import assert_close_by_rule


transformers = pytest.importorskip("transformers", reason="the transformers integration needs transformers")
# transformers 4.5x's mask builders take the query positions (cache_position) instead of q_length / q_offset
MASK_CONTRACT_4X = "cache_position" in inspect.signature(transformers.masking_utils.sdpa_mask).parameters
# 4.5x's Mllama text config has no default rope type (its rotary embedding reads rope_scaling["rope_type"])
MLLAMA_ROPE = dict(rope_scaling={"rope_type": "default"}) if MASK_CONTRACT_4X else {}

WIDTH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
VISION = dict(WIDTH, image_size=16, patch_size=4)
TEXT = dict(WIDTH, vocab_size=100, max_position_embeddings=32)
LLAMA = dict(WIDTH, vocab_size=100, num_hidden_layers=2, num_key_value_heads=1, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
IMAGE_TOKEN = 99


def seeded(fn, seed=0):
    torch.manual_seed(seed)
    return fn()


def vit():
    return seeded(lambda: transformers.ViTModel(transformers.ViTConfig(**VISION)).eval())


def clip():
    cfg = transformers.CLIPConfig(text_config=dict(TEXT, eos_token_id=2), vision_config=VISION, projection_dim=16)
    return seeded(lambda: transformers.CLIPModel(cfg).eval())


def siglip():
    cfg = transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)
    return seeded(lambda: transformers.SiglipModel(cfg).eval())


def _blip2_config():
    return transformers.Blip2Config(
        vision_config=VISION,
        qformer_config=dict(WIDTH, vocab_size=100, encoder_hidden_size=32, max_position_embeddings=32,
                            use_qformer_text_input=True),
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, word_embed_proj_dim=32),
        num_query_tokens=4, image_text_hidden_size=16, image_token_index=98)


def blip2_retrieval():
    return seeded(lambda: transformers.Blip2ForImageTextRetrieval(_blip2_config()).eval())


def blip2_generation():
    """Q-Former + OPT (which passes scaling=1.0: its queries are pre-scaled); 4 image tokens (id 98)."""
    return seeded(lambda: transformers.Blip2ForConditionalGeneration(_blip2_config()).eval())


def llava():
    cfg = transformers.LlavaConfig(vision_config=dict(VISION, model_type="clip_vision_model", projection_dim=16),
                                   text_config=dict(LLAMA, model_type="llama"), image_token_index=IMAGE_TOKEN)
    return seeded(lambda: transformers.LlavaForConditionalGeneration(cfg).eval())


def llava_next():
    cfg = transformers.LlavaNextConfig(vision_config=dict(VISION, model_type="clip_vision_model", projection_dim=16),
                                       text_config=dict(LLAMA, model_type="llama"), image_token_index=IMAGE_TOKEN,
                                       image_grid_pinpoints=[[16, 16]])
    return seeded(lambda: transformers.LlavaNextForConditionalGeneration(cfg).eval())


def vision_tower(model, cls):
    """The vision tower as a PreTrainedModel (what mmfast.patch takes): 5.x's sub-model is one; 4.5x keeps a
    bare nn.Module there, whose weights go into the standalone class (`cls`, e.g. CLIPVisionModel)."""
    tower = model.vision_model
    if isinstance(tower, transformers.PreTrainedModel):
        return tower
    wrapped = cls(model.config.vision_config).eval()
    wrapped.vision_model.load_state_dict(tower.state_dict())
    return wrapped


def ids(batch, length, low=3, high=90, seed=1):
    return torch.randint(low, high, (batch, length), generator=torch.Generator().manual_seed(seed))


def pixels(batch, size=16, seed=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def right_padding(lengths, length):
    return (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()


def left_padding(lengths, length):
    return right_padding(lengths, length).flip(-1)


# ------------------------------------------------------------------------------------------------


def _select(out, key):
    for part in key.split("."):
        out = out[int(part)] if part.isdigit() else getattr(out, part)
    return out


def forward_backward(model, inputs, keys, grads=True):
    """Selected outputs and every parameter gradient of sum_k <out_k, w_k> (fixed random weights w_k)."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    outs = {k: _select(out, k) for k in keys}
    if grads:
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                   for i, o in enumerate(outs.values())]
        total = sum((o.double() * w).sum() for o, w in zip(outs.values(), weights))
        total.backward()
    g = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach().clone() for k, v in outs.items()}, g


def _double(inputs):
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


@contextlib.contextmanager
def float64_default():
    """float64 as the default dtype, so the tensors a float64 model makes on the fly are float64 too: 4.5x's CLIP
    text mask is torch.full(finfo(model dtype).min) in the default dtype, which overflows float32."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


def assert_parity(model, inputs, keys, backend="reference", grads=True, **patch_kwargs):
    """Patch `model` (fp32) and check outputs and gradients against the stock fp64 / fp32 models."""
    model64 = copy.deepcopy(model).double()
    with float64_default():
        ref_out, ref_grad = forward_backward(model64, _double(inputs), keys, grads)
    stock_out, stock_grad = forward_backward(model, inputs, keys, grads)
    report = mmfast.patch(model, backend=backend, **patch_kwargs)
    assert report.swapped, str(report)
    got_out, got_grad = forward_backward(model, inputs, keys, grads)
    for k in keys:
        assert_close_by_rule(got_out[k], ref_out[k], stock_out[k], what=k)
    assert got_grad.keys() == stock_grad.keys()
    for name in got_grad:
        assert_close_by_rule(got_grad[name], ref_grad[name], stock_grad[name], factor=3.0, what=f"grad {name}")
    return report


class OpCounter:
    """Counts the mmfast custom ops (forward and backward) that ran while active, by torch.profiler's record
    of dispatched ops (a TorchDispatchMode around custom ops with list arguments failed intermittently)."""

    def __enter__(self):
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        self.counts = collections.Counter(e.name.split("::")[1] for e in self._prof.events()
                                          if e.name.startswith("mmfast::"))
        return False
