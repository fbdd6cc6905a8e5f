"""mmfast.patch on timm models: a tiny VisionTransformer (float64, backend="reference") before vs after, the
masks, unpatch / repatch / isolation, and ModelEmaV3 against timm's own update."""
import copy

import pytest
import torch
from dist_helpers import one_process_group
from swap_helpers import assert_bitwise, assert_same, forward_is_swapped, run, run_compiled

pytest.importorskip("timm", reason="every test here patches a timm model (timm is an optional package; "
                                   "pip install -e .[dev])")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402

import mmfast  # noqa: E402

CONFIGS = {
    "cls": {},
    "reg-tokens": {"reg_tokens": 2},
    "no-embed-class": {"no_embed_class": True},
    "no-embed-class-reg": {"no_embed_class": True, "reg_tokens": 1},
    "no-cls-avgpool": {"class_token": False, "global_pool": "avg"},
    "qk-norm": {"qk_norm": True},
    "dynamic-size": {"dynamic_img_size": True},
    "dynamic-pad-reg": {"dynamic_img_size": True, "dynamic_img_pad": True, "reg_tokens": 1},
}


def vit(**kw):
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                             **kw).double()


def images(h=16, w=16, b=2):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_outputs_and_grads_before_vs_after(kw):
    model = vit(**kw)
    sizes = [(16, 16)] + ([(24, 12), (20, 13)] if kw.get("dynamic_img_size") else [])
    sizes = [s for s in sizes if kw.get("dynamic_img_pad") or (s[0] % 4 == 0 and s[1] % 4 == 0)]
    before = [run(model, images(*s)) for s in sizes]
    report = mmfast.patch(model, backend="reference")
    assert [r.path for r in report.swapped] == ["patch_embed", "blocks.0.attn"]
    for s, b in zip(sizes, before):
        assert_same(run(model, images(*s)), b, f"{kw} at {s}")
    assert not report.fallbacks


def test_torch_compile_fullgraph():
    model = vit(reg_tokens=1, dynamic_img_size=True)
    before = run(model, images())
    report = mmfast.patch(model, backend="reference")
    torch._dynamo.reset()
    assert_same(run_compiled(model, images()), before, "compiled")
    assert not report.fallbacks


def test_patch_after_fully_shard():
    """FSDP2 swaps the model's class for a subclass made at run time: the swap still recognises timm's modules,
    and the report names the class the user built."""
    with one_process_group():
        from torch.distributed.fsdp import fully_shard

        model = vit(reg_tokens=1)
        before = run(model, images())[0]
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        report = mmfast.patch(model, backend="reference")
        assert report.model == "timm.VisionTransformer", report.model
        assert [r.path for r in report.swapped] == ["patch_embed", "blocks.0.attn"]
        after = model(images())
        assert (after - before[0]).abs().max().item() <= 1e-12 and not report.fallbacks


@pytest.mark.parametrize("mask", ["causal", "key-padding"])
def test_attention_masks(mask):
    model = vit(reg_tokens=1)
    x = images()
    N = 1 + 1 + 16
    kw = {"is_causal": True} if mask == "causal" else {
        "attn_mask": torch.tensor([[True] * N, [True] * (N - 5) + [False] * 5]).view(2, 1, 1, N)}
    before = run(model, x, method="forward_features", **kw)
    report = mmfast.patch(model, backend="reference")
    assert_same(run(model, x, method="forward_features", **kw), before, mask)
    assert not report.fallbacks


def test_unrecognised_mask_falls_back_and_is_counted():
    model = vit()
    x = images()
    float_mask = torch.zeros(2, 1, 17, 17, dtype=torch.float64)
    float_mask[..., -3:] = -1.0  # a real additive bias: not expressible as padding
    ref = model.forward_features(x, attn_mask=float_mask)
    report = mmfast.patch(model, backend="reference")
    assert torch.equal(model.forward_features(x, attn_mask=float_mask), ref)
    assert sum(report.fallbacks.values()) == 1 and "not a bool key-padding mask" in next(iter(report.fallbacks))


def test_patch_embed_called_alone_keeps_timm_meaning():
    model = vit(dynamic_img_size=True)
    x = images(16, 12)
    ref = model.patch_embed(x)  # NHWC, no positions
    mmfast.patch(model, backend="reference")
    out = model.patch_embed(x)
    assert out.shape == ref.shape and (out - ref).abs().max().item() <= 1e-12


@pytest.mark.parametrize("kw", [{"reg_tokens": 1}, {"class_token": False, "global_pool": "avg"}],
                         ids=["cls-reg", "no-prefix"])
def test_forward_hook_on_patch_embed_sees_and_edits_timm_tensor(kw):
    model = vit(**kw)
    seen = []

    def hook(module, args, out):  # an edit hook: without prefix tokens the fused path added positions twice
        seen.append(tuple(out.shape))
        return out * 2

    model.patch_embed.register_forward_hook(hook)
    before = run(model, images())
    report = mmfast.patch(model, backend="reference")
    assert_same(run(model, images()), before, f"{kw} with a hook on patch_embed")
    assert seen == [(2, 16, 32)] * 2
    assert list(report.fallbacks) == ["PatchEmbed: forward hooks on patch_embed (position embedding not fused for "
                                      "this call)"]


def test_no_position_table_skips_pos_drop_as_timm_does():
    model = vit(pos_embed="none", pos_drop_rate=0.5, reg_tokens=1).train()  # timm returns before pos_drop
    torch.manual_seed(3)
    before = run(model, images())
    mmfast.patch(model, backend="reference")
    torch.manual_seed(3)
    assert_same(run(model, images()), before, "pos_embed='none' with pos_drop_rate in training")


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa-ignores-scale", "manual-uses-scale"])
def test_attention_scale_follows_timm_path(fused):
    model = vit()
    attn = model.blocks[0].attn
    attn.fused_attn, attn.scale = fused, 0.3  # e.g. a temperature set on the module
    before = run(model, images())
    mmfast.patch(model, backend="reference")
    assert_same(run(model, images()), before, f"scale 0.3, fused_attn={fused}")


class _SharpenWeights(torch.nn.Module):
    def forward(self, weights):
        return weights.pow(2) / weights.pow(2).sum(-1, keepdim=True)


@pytest.mark.parametrize("change", ["capture-hook", "edit-hook", "module"])
def test_manual_attention_path_with_an_observed_attn_drop_runs_timm(change):
    model = vit()
    attn = model.blocks[0].attn
    attn.fused_attn = False  # timm's manual path: attn_drop receives the attention weights
    maps = []
    if change == "module":
        attn.attn_drop = _SharpenWeights()
    else:
        attn.attn_drop.register_forward_hook(
            lambda m, args, out: maps.append(out.shape) if change == "capture-hook" else out * 0.5)
    before = run(model, images())
    report = mmfast.patch(model, backend="reference")
    assert_same(run(model, images()), before, change)
    assert len(maps) == (2 if change == "capture-hook" else 0)  # the attention maps still reach the hook
    assert sum(report.fallbacks.values()) == 1 and "fused_attn off and attn_drop" in next(iter(report.fallbacks))


def test_manual_attention_path_under_a_global_forward_hook_runs_timm():
    """A global hook (register_module_forward_hook) sees attn_drop's output, the attention weights, only on
    timm's path; patch_embed's output likewise."""
    model = vit()
    model.blocks[0].attn.fused_attn = False
    before = run(model, images())
    report = mmfast.patch(model, backend="reference")
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(m))
    try:
        after = run(model, images())
    finally:
        handle.remove()
    assert_same(after, before, "global hook")
    assert any(m is model.blocks[0].attn.attn_drop for m in seen)
    assert "fused_attn off and a global module forward hook" in " ".join(report.fallbacks)
    assert "forward hooks on patch_embed" in " ".join(report.fallbacks)


@pytest.mark.parametrize("change", ["overlapping-proj", "rect-patch"])
def test_patch_embed_geometry_changed_after_patch_runs_timm(change):
    model = vit(dynamic_img_size=True, class_token=False, global_pool="avg") if change == "overlapping-proj" \
        else vit(reg_tokens=1)
    report = mmfast.patch(model, backend="reference")
    if change == "overlapping-proj":  # was a silent wrong answer: the kernel assumed kernel = stride, no padding
        torch.manual_seed(1)
        model.patch_embed.proj = torch.nn.Conv2d(3, 32, 4, stride=2, padding=2).double()  # a 9x9 grid
    else:  # was a ValueError from the kernel
        model.set_input_size(patch_size=(4, 2))
    after = run(model, images())
    mmfast.unpatch(model)
    assert_same(after, run(model, images()), change)
    assert sum(report.fallbacks.values()) == 1 and "proj is not a square stride-P conv" in next(iter(report.fallbacks))


def test_patch_embed_norm_set_after_patch_runs_timm():
    model = vit(reg_tokens=1)
    report = mmfast.patch(model, backend="reference")
    model.patch_embed.norm = torch.nn.LayerNorm(32).double()  # the fused tokens skipped it: a wrong answer
    after = run(model, images())
    mmfast.unpatch(model)
    assert_same(after, run(model, images()), "norm set after patch")
    assert list(report.fallbacks) == ["PatchEmbed: PatchEmbed has a norm before the position embedding"]


def _scale_pos_embed(model):
    inner = model._pos_embed
    model._pos_embed = lambda x: inner(x) * 1.5  # an instance override the fused path used to skip


@pytest.mark.parametrize("when", ["before-patch", "after-patch"])
def test_pos_embed_replaced_on_the_instance_is_kept(when):
    reference = vit(reg_tokens=1)
    _scale_pos_embed(reference)
    model = vit(reg_tokens=1)
    if when == "before-patch":
        _scale_pos_embed(model)
    mmfast.patch(model, backend="reference")
    if when == "after-patch":
        _scale_pos_embed(model)
    assert_same(run(model, images()), run(reference, images()), when)


def test_pickling_a_patched_model_is_refused_at_save_time_with_the_way_out():
    """torch.save(model) of a patched model wrote a file that failed to load (the swapped forwards are bound
    methods, restored by name); now the save refuses. A state_dict, or the model after unpatch, saves and
    loads, and the loaded model patches again."""
    import io

    model = vit(reg_tokens=1)
    x = images()
    mmfast.patch(model, backend="reference")
    patched = run(model, x)
    with pytest.raises(TypeError, match=r"patched model cannot be pickled.*state_dict\(\).*mmfast.unpatch"):
        torch.save(model, io.BytesIO())
    fresh = vit(reg_tokens=1)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    mmfast.unpatch(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for m in (fresh, loaded):
        mmfast.patch(m, backend="reference")
        assert_bitwise(run(m, x), patched, "saved, loaded and patched again")
    twin = copy.deepcopy(loaded)  # deep copies stay patched (ModelEmaV3 copies the model it averages)
    assert forward_is_swapped(twin.blocks[0].attn) and twin.blocks[0].attn.forward.__self__ is twin.blocks[0].attn
    assert_bitwise(run(twin, x), patched, "deep copy")


def test_unpatch_is_bitwise_and_patch_twice_is_a_noop():
    model = vit(reg_tokens=1)
    x = images()
    ref = run(model, x)
    report = mmfast.patch(model, backend="reference")
    forward = model.blocks[0].attn.forward
    assert mmfast.patch(model, backend="reference") is report
    assert model.blocks[0].attn.forward is forward and len(report.swapped) == 2
    assert mmfast.unpatch(model)
    assert not any(forward_is_swapped(m) for m in model.modules())
    assert "_pos_embed" not in model.__dict__
    assert_bitwise(run(model, x), ref, "after unpatch")
    assert not mmfast.unpatch(model)


def test_state_dict_and_parameters_untouched_and_later_models_untouched():
    model = vit()
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    mmfast.patch(model, backend="reference")
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    other = vit()
    assert not any(forward_is_swapped(m) for m in other.modules())
    assert type(other.blocks[0].attn).forward is not None and "_pos_embed" not in other.__dict__


def test_deepcopy_of_a_patched_model_swaps_the_copy():
    model = vit()
    x = images()
    ref = run(model, x)
    mmfast.patch(model, backend="reference")
    twin = copy.deepcopy(model)
    assert twin.blocks[0].attn.forward.__self__ is twin.blocks[0].attn
    assert twin.patch_embed._mmfast_vit is twin
    assert_same(run(twin, x), ref, "deep copy")


def test_disabled_families_are_left_with_the_reason():
    report = mmfast.patch(vit(), attention=False, backend="reference")
    assert [r.path for r in report.swapped] == ["patch_embed"]
    assert [(r.path, r.note) for r in report.left] == [("blocks.0.attn", "attention=False")]


def _perturbed(model, seed):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return other


@pytest.mark.parametrize("kw", [{}, {"exclude_buffers": True}, {"use_warmup": True}, {"dtype": torch.bfloat16}],
                         ids=["foreach", "no-buffers", "warmup", "bf16-stochastic-rounding"])
def test_model_ema_v3_update_equals_timm(kw):
    model = vit().float()
    ours, theirs = ModelEmaV3(model, decay=0.9, **kw), ModelEmaV3(model, decay=0.9, **kw)
    report = mmfast.patch(ours, backend="reference")
    assert report.swapped[0].now == "mmfast ema_update_" and report.integration == "timm"
    for step in range(3):
        source = _perturbed(model, step)
        ours.update(source, step=step + 5)
        theirs.update(source, step=step + 5)
    for (name, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(ours.module.pos_embed, model.pos_embed)  # the update did move the EMA


def _one_update_equals_timm(model, **kw):
    """One update of a patched ModelEmaV3 and of timm's own, bit for bit; returns the patch report."""
    ours, theirs = ModelEmaV3(model, decay=0.9, **kw), ModelEmaV3(model, decay=0.9, **kw)
    report = mmfast.patch(ours, backend="reference")
    source = _perturbed(model, 0)
    ours.update(source, step=5)
    theirs.update(source, step=5)
    for (name, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values()):
        assert torch.equal(a, b), name
    return report


def test_model_ema_v3_foreach_false_runs_timm_and_says_why():
    report = _one_update_equals_timm(vit().float(), foreach=False)
    assert list(report.fallbacks) == ["ModelEmaV3: foreach off (foreach=False, or the EMA on another device than "
                                      "the model)"]  # same device here: the reason must not claim another one


@pytest.mark.parametrize("exclude_buffers", [False, True], ids=["state-dict", "parameters"])
def test_model_ema_v3_with_tied_weights_equals_timm(exclude_buffers):
    """A tied weight appears once per name in a state_dict; timm's foreach lerp updates it once per name, which
    ema_update_ refuses (shared memory): that call runs timm's update, counted. parameters() lists it once."""
    model = vit().float()
    model.pos_drop.register_buffer("tied", model.cls_token)  # in the state_dict twice, as a tied weight is
    report = _one_update_equals_timm(model, exclude_buffers=exclude_buffers)
    fell_back = ["ModelEmaV3: a tensor listed twice in the EMA's state_dict (tied weights)"]
    assert list(report.fallbacks) == ([] if exclude_buffers else fell_back)


def test_model_ema_v3_inner_model_is_patched_too():
    ema = ModelEmaV3(vit())
    report = mmfast.patch(ema, backend="reference")
    assert {r.path for r in report.swapped} == {"", "module.patch_embed", "module.blocks.0.attn"}


def test_forward_intermediates_fuses_the_embedding_too():
    model = vit(reg_tokens=1)
    x = images()
    ref = model.forward_intermediates(x, return_prefix_tokens=True)
    mmfast.patch(model, backend="reference")
    out = model.forward_intermediates(x, return_prefix_tokens=True)
    assert (out[0] - ref[0]).abs().max().item() <= 1e-12
    for (o, p), (r, q) in zip(out[1], ref[1]):
        assert (o - r).abs().max().item() <= 1e-12 and (p - q).abs().max().item() <= 1e-12


def test_an_attention_with_parts_we_do_not_know_is_left_alone():
    model = vit()
    model.blocks[0].attn.rope = torch.nn.Identity()  # as a future timm feature would appear
    report = mmfast.patch(model, backend="reference")
    assert [(r.path, r.note) for r in report.left] == [("blocks.0.attn", "unknown parts ['rope']")]
    assert not forward_is_swapped(model.blocks[0].attn)
