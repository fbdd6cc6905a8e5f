"""mmfast.models: architectures assembled on mmfast's kernels (one file per architecture), drop-in for the
Hugging Face / timm / open_clip models they convert from."""
from ._common import BaseModelOutputWithPooling, CLIPOutput, MaskedPatchOutput, ModelOutput
from .albef import ALBEF
from .blip import BLIP, BLIPForConditionalGeneration, BLIPForImageTextRetrieval, capfilt
from .vit import ViT

__all__ = ["ALBEF", "BLIP", "BLIPForConditionalGeneration", "BLIPForImageTextRetrieval", "BaseModelOutputWithPooling", "CLIPOutput", "MaskedPatchOutput", "ModelOutput", "ViT", "capfilt"]
