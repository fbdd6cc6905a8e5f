"""mmfast.models: architectures assembled on mmfast's kernels (one file per architecture), drop-in for the
Hugging Face / timm / open_clip models they convert from."""
from ._common import BaseModelOutputWithPooling, CLIPOutput, MaskedPatchOutput, ModelOutput
from .vit import ViT
from .clip import CLIP, TextTransformer
from .moco import MoCo, MoCoOutput
from ._presets import PRESETS, create_model

__all__ = ["BaseModelOutputWithPooling", "CLIPOutput", "MaskedPatchOutput", "ModelOutput", "TextTransformer", "ViT", "CLIP", "MoCo", "MoCoOutput", "PRESETS", "create_model"]
