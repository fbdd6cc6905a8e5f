"""benchmarks/models.py beyond the smoke run every suite gets (test_bench_smoke.py): the per-family share of a
profiled step counts the mmfast:: custom ops of the right family, and the GPU sizes are the ones the
benchmark promises (built lazily: listing them allocates nothing)."""
import torch

from mmfast.benchmarks import models
from mmfast.benchmarks.common import suite_module, suite_names
from mmfast.kernels import flash_attention


def test_models_is_a_suite():
    assert "models" in suite_names() and suite_module("models") is models


def test_family_of_maps_custom_ops_to_their_family():
    assert models._family_of("mmfast::flash_attention_bwd") == "attention"
    assert models._family_of("mmfast::contrastive_loss_fwd") == "contrastive"
    assert models._family_of("mmfast::patch_embed_fwd") == "patch_embed"


def test_family_shares_counts_the_attention_op():
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    shares, ms, busy = models.family_shares(lambda: flash_attention(q, k, v, backend="triton"), torch.device("cpu"))
    assert ms > 0 and busy is None and set(shares) == {"attention"}, shares
    assert 0 < shares["attention"] <= 1.0


def test_gpu_workloads_are_the_promised_sizes():
    wls = {w.name: w for w in models.workloads("quick", torch.device("cuda"))}
    assert set(wls) == {"clip ViT-B/16 b=256 vs hf", "clip ViT-B/16 b=256 vs open_clip", "clip ViT-L/14 b=256 vs hf",
                        "clip ViT-L/14 b=256 vs open_clip", "blip base b=64 vs hf", "clip_loss N=32768 D=512"}
    assert wls["clip ViT-L/14 b=256 vs hf"].info["params"] > 400e6  # the 428M preset, not a tiny one
    assert wls["clip ViT-B/16 b=256 vs hf"].info["target_speedup"] == 1.3
    assert wls["clip ViT-B/16 b=256 vs open_clip"].info["target_speedup"] == 1.15
    # the headline is CLIP ViT-B/16's training step vs Hugging Face (the loss alone is contrastive's headline)
    assert [w for w in wls.values() if w.info["headline"]] == [wls["clip ViT-B/16 b=256 vs hf"]]
