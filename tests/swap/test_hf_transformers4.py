"""The transformers integration on transformers 4.5x, in a subprocess (the suite itself runs one transformers).

Runs only when MMFAST_TRANSFORMERS4_PATH names a folder holding transformers 4.5x (e.g. a
``pip install --target`` of transformers 4.57): it is put first on the subprocess' sys.path and a
representative subset of these tests runs there: the mask builder's 4.5x contract, ViT and CLIP (padded
text) outputs and gradients, CLIP through the Triton interpreter with the mmfast ops counted, LLaVA
(Llama, GQA) left-padded with greedy generation, Mistral / Qwen2 sliding windows, the per-instance swaps of
BLIP, Mllama and Idefics against 4.5x's own code, BLIP-2's Q-Former (swapped per instance there, eager
additive masks), patch / unpatch / refusals, PEFT's LoRA adapters kept (Mllama's gated layers, the patch convolutions)
and gradient checkpointing with transformers' input-grad hook on the fused patch embeddings; and the model
layer's conversions (from_hf: ViT and CLIP / SigLIP towers, CLIP, BLIP-2, LLaVA-NeXT, Mllama, Idefics) with
parity and generation against 4.5x's own models (tests/models files, listed relative to this folder).
"""
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

PATH = os.environ.get("MMFAST_TRANSFORMERS4_PATH")
pytestmark = pytest.mark.skipif(not PATH, reason="MMFAST_TRANSFORMERS4_PATH is not set (a folder holding transformers "
                                                 "4.5x, prepended to sys.path in a subprocess)")

HERE = pathlib.Path(__file__).parent
SUBSET = [
    "test_hf_attention.py",
    "test_hf_vit.py::test_vit_parity",
    "test_hf_clip.py::test_clip_parity",
    "test_hf_clip.py::test_clip_triton_interpreter_runs_mmfast_ops",
    "test_hf_llava.py",
    "test_hf_llava_lms.py::test_outputs_and_gradients_fp32_within_rule",   # sliding windows (Mistral, Qwen2)
    "test_hf_patch.py",
    "test_hf_blip.py",                                                      # bypass swaps: eager masks, caches
    "test_hf_blip2.py",                                                     # 4.5x: Q-Former swapped per instance
    "test_hf_mllama.py::test_forward_backward_match_transformers_fp64",
    "test_hf_mllama.py::test_mmfast_patch_generation_identical_and_unpatch_bitwise",
    "test_hf_idefics.py",
    "test_verify.py::test_cli_hf_config_directory_loads_offline",          # verify's float64 reference on 4.5x
    "test_peft.py::test_mllama_lora_on_gated_layers_is_kept",               # real peft LoRA (dev extra), both orders
    "test_peft.py::test_clip_lora_on_patch_embedding_runs_the_conv",
    "test_peft.py::test_verify_a_peft_model",
    "test_hf_checkpointing.py",                                             # 4.5x: input-grad hook placement
    "test_hf_mllama_tiles.py::test_input_grad_hook_is_reproduced",          # fused tiles keep the input-grad mark
    # the model layer's from_hf on 4.5x's layouts (hf_compat): one parity, one generation per family
    "../models/test_vit.py::test_hf_parity",                                # 4.x ViT: encoder.layer, BERT names
    "../models/test_vit.py::test_hf_clip_vision_tower",                     # 4.x *VisionModel.vision_model
    "../models/test_clip.py::test_hf_clip_parity",                          # 4.x CLIP mask in the default dtype
    "../models/test_blip2.py::test_logits_loss_and_grads_match_hf_left_padded",
    "../models/test_blip2.py::test_greedy_generation_equals_hf",
    "../models/test_llava.py::test_next_logits_and_generation_match_hf",   # AnyRes features, generation
    "../models/test_mllama.py::test_logits_and_loss_match_hf_left_padded_two_images",  # 4.x rope_scaling
    "../models/test_mllama.py::test_generation_equals_hf[greedy]",
    "../models/test_flamingo_idefics.py::test_logits_and_loss_match_hf_left_padded",  # Idefics: 4.x RoPE fields
    "../models/test_flamingo_idefics.py::test_greedy_generation_equals_hf[image_encoder_embeddings]",
    "../nn/test_decoder.py::test_rope_inv_freq_equals_transformers",       # Llama 3 RoPE from 4.x's rope_scaling
    "../nn/test_decoder.py::test_logits_loss_and_grads_match_hf",          # DecoderLM.from_hf: Llama, OPT
]
# skipped there by design: 4.5x has no bidirectional mask builder (the monkeypatched refusal's real
# counterpart runs instead), and its own LLaVA does not compile fullgraph
EXPECTED_SKIPS = {"test_bidirectional_padding", "test_patched_model_compiles_fullgraph"}


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PATH, env.get("PYTHONPATH")) if p)
    return env


def test_transformers4_subset(tmp_path):
    version = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                             env=_env(), capture_output=True, text=True, timeout=120)
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.strip().startswith("4."), f"MMFAST_TRANSFORMERS4_PATH gives transformers {version.stdout}"
    report = tmp_path / "junit.xml"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                          *(str(HERE / t) for t in SUBSET)],
                         cwd=HERE.parent.parent, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    skipped = {c.get("name").split("[")[0] for c in cases if c.find("skipped") is not None}
    assert skipped == EXPECTED_SKIPS, (skipped, run.stdout[-3000:])
