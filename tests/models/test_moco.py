"""MoCo v2 / v3: the loss equals the papers' formulas, the key encoder follows the momentum formula and gets no
gradient, v2's queue takes the keys in order, an optimiser step lowers the loss, and a moco-v3 checkpoint
(timm ViT base encoder, as moco-v3's vits.py) loads with the same outputs. The distributed runs (2 gloo
processes vs one on the concatenated batch) are in tests/mmfast/test_training.py."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from numerics import SEED, assert_close_by_rule, randn
from torch import nn

from mmfast.kernels import interpreting
from mmfast.models import MoCo, ViT
from mmfast.models.moco import build_mlp, cosine_momentum

B, C, S, WIDTH, DIM, MLP = 6, 3, 8, 24, 16, 20


def _backbone():
    return nn.Sequential(nn.Flatten(), nn.Linear(C * S * S, WIDTH), nn.GELU())


def _model(version, dtype=torch.float64, **kw):
    torch.manual_seed(SEED)
    kw = dict(dict(dim=DIM, mlp_dim=MLP, queue_size=10, backend="reference"), **kw)
    model = MoCo(_backbone(), WIDTH, version=version, **kw).to(dtype)
    with torch.no_grad():  # key encoder != query encoder, as after training
        for p in model.base_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _views(dtype=torch.float64):
    return randn(B, C, S, S, dtype=dtype), randn(B, C, S, S, dtype=dtype)


def _ce(q, k, t):
    return F.cross_entropy(F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / t, torch.arange(q.shape[0]))


def test_v3_loss_is_moco_v3s():
    model = _model("v3")
    out = model(*_views())
    q1, q2, k1, k2 = out.q[:B], out.q[B:], out.k[:B], out.k[B:]
    expected = (_ce(q1, k2, 0.2) + _ce(q2, k1, 0.2)) * 2 * 0.2
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)


def test_v2_loss_and_queue_order():
    model = _model("v2")
    queue = model.queue.queue.clone()
    model.queue.ptr.fill_(7)  # enqueue wraps: slots 7, 8, 9, 0, 1, 2
    out = model(*_views())
    k = out.k
    # the batch's other keys are negatives too; the queue holds unit vectors (fp32-rounded at init)
    logits = F.normalize(out.q, dim=1) @ F.normalize(torch.cat([k, queue]), dim=1).T / 0.2
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, torch.arange(B)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k.norm(dim=1), torch.ones(B, dtype=k.dtype))
    slots = [(7 + i) % 10 for i in range(B)]
    torch.testing.assert_close(model.queue.queue[slots], k, rtol=0, atol=0)
    untouched = [i for i in range(10) if i not in slots]
    torch.testing.assert_close(model.queue.queue[untouched], queue[untouched], rtol=0, atol=0)
    assert int(model.queue.ptr) == (7 + B) % 10


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_momentum_update_and_no_grad_to_key_encoder(version):
    model = _model(version)
    online = [p.detach().clone() for p in model.base_encoder.parameters()]
    ema = [p.detach().clone() for p in model.momentum_encoder.ema.parameters()]
    m = 0.75
    out = model(*_views(), momentum=m)
    for e_new, e, o in zip(model.momentum_encoder.ema.parameters(), ema, online):
        torch.testing.assert_close(e_new, m * e + (1 - m) * o, rtol=1e-14, atol=1e-14)
    out.loss.backward()
    assert not out.k.requires_grad
    assert all(p.grad is None and not p.requires_grad for p in model.momentum_encoder.ema.parameters())
    assert all(p.grad is not None for p in model.base_encoder.parameters())


def test_cosine_momentum():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    # moco-v3's main_moco.py: 1 - 0.5 * (1 + cos(pi * epoch / epochs)) * (1 - moco_m)
    assert cosine_momentum(30, 100, 0.9) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi * 0.3)) * 0.1)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_one_step_lowers_the_loss(version):
    model = _model(version, dtype=torch.float32)
    x = _views(torch.float32)
    state = {k: v.clone() for k, v in model.queue.state_dict().items()} if version == "v2" else None
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loss0 = model(*x, momentum=1.0).loss  # m = 1: the key encoder stays put, so the batch's loss is comparable
    loss0.backward()
    opt.step()
    if state is not None:
        model.queue.load_state_dict(state)  # the same negatives as the first call
    loss1 = model(*x, momentum=1.0).loss
    assert loss1.item() < loss0.item()


@pytest.mark.skipif(not interpreting(), reason="the Triton path runs on CUDA tensors only outside the interpreter")
def test_triton_path_matches_reference():
    ref = _model("v3", dtype=torch.float32)
    tri = copy.deepcopy(ref)
    tri.backend, tri.momentum_encoder.backend = "triton", "triton"
    x = _views(torch.float32)
    x64 = tuple(v.double() for v in x)
    r64 = copy.deepcopy(ref).double()
    losses = {}
    for name, model, inputs in (("triton", tri, x), ("torch", ref, x), ("fp64", r64, x64)):
        losses[name] = model(*inputs, momentum=0.9).loss
        losses[name].backward()
    assert_close_by_rule(losses["triton"], losses["fp64"], losses["torch"], what="loss")
    for (name, p), q, p64 in zip(tri.named_parameters(), ref.parameters(), r64.parameters()):
        if p.grad is not None:
            assert_close_by_rule(p.grad, p64.grad, q.grad, factor=3.0, what=f"grad {name}")
    for p, p64 in zip(tri.momentum_encoder.ema.parameters(), r64.momentum_encoder.ema.parameters()):
        torch.testing.assert_close(p.double(), p64, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# moco-v3 checkpoints

class _MoCoV3Reference(nn.Module):
    """moco-v3's MoCo_ViT (moco/builder.py) on one process: base encoder = timm ViT with its head replaced by
    the projector, a deep copy as momentum encoder, the predictor; loss CE(q·kᵀ/T)·2T."""

    def __init__(self, vit, dim, mlp_dim, t):
        super().__init__()
        hidden = vit.head.weight.shape[1]
        vit.head = build_mlp(3, hidden, mlp_dim, dim)
        self.base_encoder, self.momentum_encoder = vit, copy.deepcopy(vit)
        self.predictor = build_mlp(2, dim, mlp_dim, dim)
        self.T = t

    def _ctr(self, q, k):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / self.T
        return F.cross_entropy(logits, torch.arange(q.shape[0])) * (2 * self.T)

    def forward(self, x1, x2, m):
        q1, q2 = self.predictor(self.base_encoder(x1)), self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            for pb, pm in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
                pm.data = pm.data * m + pb.data * (1.0 - m)
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        return self._ctr(q1, k2) + self._ctr(q2, k1)


def _tiny_vit(num_classes):
    timm = pytest.importorskip("timm", reason="the MoCo v3 backbone here is timm's ViT (timm is optional)")
    return timm.models.vision_transformer.VisionTransformer(
        img_size=S, patch_size=4, embed_dim=WIDTH, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=num_classes)


@pytest.mark.parametrize("convert", [None, "vit"], ids=["timm-backbone", "mmfast-vit"])
def test_from_state_dict_moco_v3_checkpoint(convert):
    torch.manual_seed(SEED)
    ref = _MoCoV3Reference(_tiny_vit(num_classes=10), DIM, MLP, 0.2).double()
    with torch.no_grad():  # a trained checkpoint: momentum encoder != base encoder
        for p in ref.momentum_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref(*_views(), 0.9)  # BN running statistics away from their initial values
    checkpoint = {"epoch": 1, "state_dict": {"module." + k: v.clone() for k, v in ref.state_dict().items()}}
    model = MoCo.from_state_dict(checkpoint, _tiny_vit(num_classes=0), temperature=0.2, backend="reference",
                                 convert=ViT.from_timm if convert else None)
    assert isinstance(model.base_encoder.backbone, ViT) == bool(convert)
    assert (model.predictor[0].weight.shape, len(model.base_encoder.head)) == ((MLP, DIM), 8)
    ours = model.state_dict()
    for key, value in ref.state_dict().items() if convert is None else ():
        prefix, rest = key.split(".", 1)
        mapped = key if prefix == "predictor" else (
            ("base_encoder." if prefix == "base_encoder" else "momentum_encoder.ema.")
            + (rest if rest.startswith("head.") else "backbone." + rest))
        torch.testing.assert_close(ours[mapped], value, rtol=0, atol=0, msg=f"{key} -> {mapped}")
    x = _views()
    torch.testing.assert_close(model(*x, momentum=0.9).loss, ref(*x, 0.9), rtol=1e-12, atol=1e-12)
    model.eval(), ref.eval()
    torch.testing.assert_close(model.momentum_encoder(x[0]), ref.momentum_encoder(x[0]), rtol=1e-12, atol=1e-12)


def test_from_state_dict_rejects_other_checkpoints():
    with pytest.raises(ValueError, match="moco-v3"):
        MoCo.from_state_dict({"encoder_q.fc.0.weight": torch.zeros(2, 2)}, _backbone())


@pytest.mark.parametrize("kwargs, name", [
    (dict(version="v4"), "version"), (dict(dim=0), "dim"), (dict(temperature=0.0), "temperature"),
    (dict(momentum=1.5), "momentum"), (dict(queue_size=0), "queue_size"), (dict(backend="cuda"), "backend"),
    (dict(shuffle_bn=True), "shuffle_bn"),
], ids=["version", "dim", "temperature", "momentum", "queue_size", "backend", "shuffle_bn-v3"])
def test_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MoCo(_backbone(), WIDTH, **kwargs)
