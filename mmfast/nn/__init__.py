"""nn.Modules that hold parameters and call mmfast's functional ops."""
from .attention import MultiheadAttention
from .contrastive import ContrastiveLoss, MoCoQueue
from .momentum import MomentumEncoder
from .patch_embed import PatchEmbed

__all__ = ["ContrastiveLoss", "MoCoQueue", "MomentumEncoder", "MultiheadAttention", "PatchEmbed"]
