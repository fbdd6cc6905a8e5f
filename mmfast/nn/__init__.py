"""nn.Modules that hold parameters and call mmfast's functional ops."""
from .attention import MultiheadAttention
from .contrastive import ContrastiveLoss, MoCoQueue
from .decoder import DecoderLayer, DecoderLM, RMSNorm, SwiGLU
from .gated_cross_attention import GatedCrossAttentionBlock, PerceiverResampler
from .momentum import MomentumEncoder
from .patch_embed import PatchEmbed
from .rope import RotaryEmbedding
from .transformer import AttentionPool, Mlp, TransformerEncoder, TransformerLayer

__all__ = ["ContrastiveLoss", "GatedCrossAttentionBlock", "MoCoQueue", "MomentumEncoder", "MultiheadAttention", "PatchEmbed", "PerceiverResampler", "AttentionPool", "Mlp", "TransformerEncoder", "TransformerLayer", "DecoderLayer", "DecoderLM", "RMSNorm",
           "RotaryEmbedding", "SwiGLU"]
