"""Named model sizes: tiny ones for tests and the papers' sizes. ``create_model(name, **overrides)``
builds one (under ``torch.device("meta")`` for a parameter count without memory)."""
from ._common import clip_vision_args
from .blip2 import Blip2
from .clip import CLIP
from .flamingo import PRESETS as _FLAMINGO
from .flamingo import Flamingo
from .llava import PRESETS as _LLAVA
from .llava import Llava, LlavaNext
from .mllama import PRESETS as _MLLAMA, Mllama
from .vit import ViT

_CLIP_TEXT = dict(vocab_size=49408, max_len=77, width=512, depth=12, num_heads=8, act="quick_gelu", norm_eps=1e-5,
                  eos_token_id=2)


_clip_vision = clip_vision_args


# name -> (class, constructor arguments, what the paper / reference implementation reports)
PRESETS = {
    "vit-tiny-test": (ViT, dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10), None),
    "vit-b/16": (ViT, dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000),
                 "86M (ViT paper, Table 1; timm vit_base_patch16_224: 86.57M)"),
    "vit-l/16": (ViT, dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, num_classes=1000),
                 "307M (ViT paper, Table 1; timm vit_large_patch16_224: 304.3M)"),
    "vit-h/14": (ViT, dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, num_classes=1000),
                 "632M (ViT paper, Table 1)"),
    "clip-tiny-test": (CLIP, dict(vision=_clip_vision(16, 4, 32, 2, 2), projection_dim=24,
                                  text=dict(_CLIP_TEXT, vocab_size=99, max_len=12, width=32, depth=2, num_heads=2)),
                       None),
    "clip-vit-b/32": (CLIP, dict(vision=_clip_vision(224, 32, 768, 12, 12), text=_CLIP_TEXT, projection_dim=512),
                      "151.3M (openai/clip-vit-base-patch32)"),
    "clip-vit-b/16": (CLIP, dict(vision=_clip_vision(224, 16, 768, 12, 12), text=_CLIP_TEXT, projection_dim=512),
                      "149.6M (openai/clip-vit-base-patch16)"),
    "clip-vit-l/14": (CLIP, dict(vision=_clip_vision(224, 14, 1024, 24, 16), projection_dim=768,
                                 text=dict(_CLIP_TEXT, width=768, num_heads=12)),
                      "428M (CLIP paper; openai/clip-vit-large-patch14: 427.6M)"),
    "clip-vit-l/14-336": (CLIP, dict(vision=_clip_vision(336, 14, 1024, 24, 16), projection_dim=768,
                                     text=dict(_CLIP_TEXT, width=768, num_heads=12)),
                          "428M (openai/clip-vit-large-patch14-336)"),
    "siglip-b/16-224": (CLIP, dict(vision=dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                               act="gelu_tanh", class_token=False, global_pool="map"),
                                   text=dict(vocab_size=32000, max_len=64, width=768, depth=12, num_heads=12,
                                             act="gelu_tanh", norm_eps=1e-6, causal=False, pool="last",
                                             head_dim=768),
                                   projection_dim=None, loss="siglip"),
                        "203M (google/siglip-base-patch16-224)"),
    "llava-1.5-7b": (Llava, _LLAVA["llava-1.5-7b"], "7.06B (llava-hf/llava-1.5-7b-hf)"),
    "llava-next-vicuna-7b": (LlavaNext, _LLAVA["llava-next-vicuna-7b"], "7.06B (llava-hf/llava-v1.6-vicuna-7b-hf)"),
    # Blip2's constructor takes built parts: its from_preset builds them from blip2.PRESETS
    "blip2-opt-2.7b": (Blip2.from_preset, dict(name="blip2-opt-2.7b"),
                       "3.74B (transformers' model of Salesforce/blip2-opt-2.7b's config)"),
    "llama-3.2-11b-vision": (Mllama, _MLLAMA["llama-3.2-11b-vision"], "10.6B (meta-llama/Llama-3.2-11B-Vision)"),
    # openflamingo/OpenFlamingo-9B-deprecated: OpenAI CLIP ViT-L/14 + LLaMA-7B, a gated block every 4th layer
    "openflamingo-9b-llama": (Flamingo, _FLAMINGO["openflamingo-9b-llama"],
                              "8.22B, 1.18B of them trainable (open_flamingo's model of that shape, without the "
                              "vision projection it never uses)"),
}


def create_model(name, **overrides):
    """Build preset `name` (see PRESETS), its arguments updated by `overrides` (e.g. backend=)."""
    if name not in PRESETS:
        raise ValueError(f"create_model: name must be one of {sorted(PRESETS)}, got {name!r}")
    cls, args, _ = PRESETS[name]
    return cls(**{**args, **overrides})
