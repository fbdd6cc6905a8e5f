"""mmfast.verify and `python -m mmfast verify`: passes on tiny timm / open_clip models, fails when a swapped
module computes something else, says so for a model it does not know, and counts the mmfast ops that ran."""

import pytest
import torch
from optional_deps import optional_import, requires

import mmfast
from mmfast.swap import timm as timm_swap
from mmfast.verify_cli import main, parse_overrides

timm_vit = optional_import("timm.models.vision_transformer")
open_clip_model = optional_import("open_clip.model")


def vit(dtype=torch.float32):
    torch.manual_seed(0)
    return timm_vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                                      reg_tokens=1).to(dtype)


@requires("timm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_verify_passes_and_leaves_the_model_alone(dtype):
    model = vit(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = mmfast.verify(model, backend="reference", quiet=True)
    assert result.passed, str(result)
    names = {(r.kind, r.name) for r in result.rows}
    assert {("output", "output"), ("grad", "blocks.0"), ("grad", "patch_embed.proj"), ("grad", "reg_token"),
            ("input grad", "input[0]")} <= names
    assert {row[0] for row in result.modules} == {"<model>", "patch_embed", "blocks.0.attn"}
    assert all(row[2] == 1 for row in result.modules)  # every swapped module ran once
    # verify counts calls with global module hooks; they must not push patch_embed off its fused path
    assert not result.report.fallbacks, result.report.fallbacks
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@requires("timm")
def test_verify_fails_when_a_swap_computes_something_else(monkeypatch):
    real = timm_swap._attention_forward

    def slightly_wrong(self, x, attn_mask=None, is_causal=False):
        return real(self, x, attn_mask, is_causal) * (1 + 1e-3)

    monkeypatch.setattr(timm_swap, "_attention_forward", slightly_wrong)
    result = mmfast.verify(vit(), backend="reference", quiet=True)
    failed = {r.name for r in result.rows if not r.passed}
    assert not result.passed and {"output", "blocks.0"} <= failed


def test_unknown_model_gets_a_clear_message(capsys):
    result = mmfast.verify(torch.nn.Linear(3, 3))
    out = capsys.readouterr().out
    assert not result.passed and not result.rows
    assert "torch.Linear is not a model mmfast knows how to patch" in out and "nothing to verify" in out


def triton_ops(model):
    """verify on the Triton backend (must pass): {module path: the mmfast ops it ran}."""
    result = mmfast.verify(model, backend="triton", quiet=True)
    assert result.passed, str(result)
    return {row[0]: row[3] for row in result.modules}


@requires("open_clip")
def test_triton_interpreter_runs_our_ops_in_a_clip():
    torch.manual_seed(0)
    model = open_clip_model.CLIP(embed_dim=16, vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
                                 text_cfg=dict(context_length=7, vocab_size=100, width=32, heads=2, layers=1))
    ops = triton_ops(model)
    assert ops["visual"] == "patch_embed_fwd x1"
    assert ops["visual.transformer.resblocks.0.attn"] == "flash_attention_fwd x1"
    assert ops["transformer.resblocks.0.attn"] == "flash_attention_fwd x1"
    assert ops["(backward)"] == "flash_attention_bwd x2, patch_embed_bwd x1"


@requires("timm")
def test_triton_interpreter_runs_our_ops_in_a_timm_vit():
    """timm's swaps (fused patch embedding with a register token, attention) through the Triton kernels."""
    torch.manual_seed(0)
    model = timm_vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                                       reg_tokens=1, qk_norm=True)
    ops = triton_ops(model)
    assert ops["patch_embed"] == "patch_embed_fwd x1"
    assert ops["blocks.0.attn"] == "flash_attention_fwd x1"
    assert ops["(backward)"] == "flash_attention_bwd x1, patch_embed_bwd x1"


TINY_TIMM = ["--set", "depth=1", "--set", "embed_dim=32", "--set", "num_heads=2", "--set", "img_size=16",
             "--set", "patch_size=8", "--set", "num_classes=3"]


@requires("timm")
def test_cli_timm_name(capsys):
    assert main(["vit_tiny_patch16_224", *TINY_TIMM, "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.attn  timm Attention (SDPA) -> mmfast flash_attention" in out and "0 failed" in out


@requires("transformers")
def test_cli_hf_config_directory_loads_offline(tmp_path, capsys):
    from transformers import CLIPConfig

    CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                vocab_size=100, max_position_embeddings=16),
               vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=16, patch_size=8), projection_dim=16).save_pretrained(tmp_path)
    # built from the local config without weights, inputs generated (images, a padded text row), verified
    assert main([str(tmp_path), "--set", "vision_config.num_hidden_layers=1", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "transformers.CLIPModel" in out and "0 failed" in out and "text_model.encoder.layers.0" in out


@requires("timm", "open_clip")  # the CLI asks both whether they know the name
def test_cli_unknown_name_and_bad_override(capsys):
    assert main(["not_a_model_anywhere"]) == 2
    assert "unknown model 'not_a_model_anywhere'" in capsys.readouterr().out
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_overrides(["depth"])
    with pytest.raises(SystemExit):
        main(["vit_tiny_patch16_224", "--set", "depth"])


@requires("timm")
def test_verify_validates_its_arguments():
    with pytest.raises(ValueError, match="inputs must be"):
        mmfast.verify(vit(), inputs=3)
    with pytest.raises(ValueError, match="seed"):
        mmfast.verify(vit(), seed=1.5)


@requires("timm")
def test_verify_a_patched_model_compares_against_the_unpatched_one():
    model = vit()
    mmfast.patch(model, attention=False, backend="reference")
    result = mmfast.verify(model, backend="reference", quiet=True)
    assert result.passed and {row[0] for row in result.modules} == {"<model>", "patch_embed", "blocks.0.attn"}
    state = mmfast.swap._core.patch_state(model)
    assert state is not None and not state.options.attention  # patched again as the user had it


@pytest.mark.parametrize("blocked", [("open_clip",), ("timm", "open_clip")],
                         ids=["no-open_clip", "no-timm-no-open_clip"])
def test_cli_kind_without_timm_or_open_clip(monkeypatch, capsys, blocked):
    """A missing timm / open_clip only rules out its kind: Hub ids and config directories still resolve."""
    import sys

    from mmfast.verify_cli import _kind

    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)   # `import name` raises ImportError
    assert _kind("meta-llama/Llama-3.2-11B-Vision") == ("hf", "meta-llama/Llama-3.2-11B-Vision")
    assert _kind("hf:org/name") == ("hf", "org/name")
    assert main(["not_a_model_anywhere"]) == 2
    out = capsys.readouterr().out
    assert "unknown model 'not_a_model_anywhere'" in out and f"{' and '.join(blocked)} did not import here" in out


@requires("transformers")
def test_cli_hf_path_runs_without_timm_and_open_clip(monkeypatch, tmp_path, capsys):
    import sys

    from transformers import SiglipVisionConfig

    SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=16, patch_size=8).save_pretrained(tmp_path)
    for name in ("timm", "open_clip"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main([str(tmp_path), "--set", "num_hidden_layers=1", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "transformers.SiglipVisionModel" in out and "0 failed" in out


@requires("transformers")
def test_hf_model_without_generated_inputs_asks_for_them():
    import hf_models

    with pytest.raises(ValueError, match="no generated inputs for transformers model type 'llava' .*; pass inputs="):
        mmfast.verify(hf_models.llava(), backend="reference", quiet=True)
