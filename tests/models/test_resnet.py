"""mmfast.models.ModifiedResNet (CLIP's ResNet image tower): parity with open_clip's ModifiedResNet inside an
open_clip RN CLIP (outputs, loss and gradients, tiny config), train-mode BatchNorm, the attention pool through
the Triton interpreter."""
import pytest
import torch
from model_helpers import OpenClipOutputs, check_parity
from numerics import generator, randn
from optional_deps import optional_import, requires

from mmfast.models import CLIP, ModifiedResNet

open_clip = optional_import("open_clip")


def open_clip_rn():
    """A tiny RN CLIP (stages 1-2-1-1, stem width 8, 64 px: a 2x2 final map, 4 heads of 64). open_clip zeroes
    each block's last BatchNorm scale and starts the running statistics at 0 / 1: random values make the
    residual branches and the statistics count."""
    torch.manual_seed(generator().initial_seed())
    oc = open_clip.model.CLIP(32, dict(layers=(1, 2, 1, 1), width=8, image_size=64, head_width=64),
                              dict(context_length=12, vocab_size=99, width=32, heads=2, layers=1))
    g = generator()
    with torch.no_grad():
        for m in oc.visual.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return oc.eval()


@requires("open_clip")
def test_open_clip_rn_parity():
    oc = open_clip_rn()
    ours = CLIP.from_open_clip(oc, backend="reference")
    assert isinstance(ours.vision_model, ModifiedResNet) and ours.visual_projection is None
    ids = torch.randint(3, 90, (3, 12), generator=generator())
    ids[:, 7] = 98  # the highest id: the EOT of open_clip's argmax pooling
    params = ([lambda m: m.vision_model.attnpool.attn.qkv.weight, lambda m: m.vision_model.layer2[1].conv2.weight],
              [lambda m: (m.model.visual.attnpool.q_proj.weight, m.model.visual.attnpool.k_proj.weight,
                          m.model.visual.attnpool.v_proj.weight), lambda m: m.model.visual.layer2[1].conv2.weight])
    check_parity(ours, OpenClipOutputs(oc), dict(input_ids=ids, pixel_values=randn(3, 3, 64, 64), return_loss=True),
                 ["loss", "logits_per_image", "image_embeds", "text_embeds"], *params, what="open_clip RN")


@requires("open_clip")
def test_train_mode_batch_norm_matches_open_clip():
    """In training mode both use (and update) the batch statistics."""
    oc = open_clip_rn().visual.train()
    ours = ModifiedResNet.from_open_clip(oc, backend="reference")
    assert ours.training
    x = randn(4, 3, 64, 64)
    torch.testing.assert_close(ours(x).pooler_output, oc(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.layer3[0].bn2.running_mean, oc.layer3[0].bn2.running_mean, rtol=1e-5, atol=1e-6)


def test_attention_pool_triton_interpreter_matches_reference():
    torch.manual_seed(generator().initial_seed())
    ref = ModifiedResNet((1, 1, 1, 1), 32, 4, 64, 8, backend="reference").eval()
    tri = ModifiedResNet((1, 1, 1, 1), 32, 4, 64, 8, backend="triton").eval()
    tri.load_state_dict(ref.state_dict())
    outs, pixels = [], randn(2, 3, 64, 64)
    for m in (ref, tri):
        x = pixels.clone().requires_grad_()
        out = m(x, output_hidden_states=True)
        out.pooler_output.square().sum().backward()
        outs.append((out.pooler_output, x.grad, m.attnpool.attn.qkv.weight.grad))
        assert len(out.hidden_states) == 5 and out.last_hidden_state.shape == (2, 256, 2, 2)
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_validation():
    with pytest.raises(ValueError, match="multiple of 32"):
        ModifiedResNet(image_size=100)
    with pytest.raises(ValueError, match="layers"):
        ModifiedResNet(layers=(1, 2))
    with pytest.raises(ValueError, match="output_attentions"):
        ModifiedResNet((1, 1, 1, 1), 32, 4, 64, 8)(randn(1, 3, 64, 64), output_attentions=True)
    with pytest.raises(ValueError, match="projection_dim"):
        CLIP(ModifiedResNet((1, 1, 1, 1), 32, 4, 64, 8), dict(vocab_size=50, max_len=8, width=32, depth=1, num_heads=2),
             projection_dim=16)
