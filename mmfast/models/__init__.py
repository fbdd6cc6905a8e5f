"""mmfast.models: architectures assembled on mmfast's kernels (one file per architecture), drop-in for the
Hugging Face / timm / open_clip models they convert from."""
from ._common import BaseModelOutputWithPooling, CLIPOutput, MaskedPatchOutput, ModelOutput
from .albef import ALBEF
from .blip2 import Blip2, Blip2ForImageTextRetrieval
from .blip import BLIP, BLIPForConditionalGeneration, BLIPForImageTextRetrieval, capfilt
from .resnet import ModifiedResNet
from .vit import ViT
from .clip import CLIP, TextTransformer
from .moco import MoCo, MoCoOutput
from .llava import Llava, LlavaNext
from .mllama import Mllama
from .flamingo import Flamingo
from ._presets import PRESETS, create_model

__all__ = ["ALBEF", "BLIP", "BLIPForConditionalGeneration", "BLIPForImageTextRetrieval", "Blip2",
           "Blip2ForImageTextRetrieval", "BaseModelOutputWithPooling", "CLIP", "CLIPOutput", "Flamingo", "Llava",
           "LlavaNext", "MaskedPatchOutput", "Mllama", "MoCo", "MoCoOutput", "ModelOutput",
           "ModifiedResNet", "PRESETS", "TextTransformer",
           "ViT", "capfilt", "create_model"]
