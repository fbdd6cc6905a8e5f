"""nn.Modules that hold parameters and call mmfast's functional ops."""
from .attention import MultiheadAttention
from .momentum import MomentumEncoder

__all__ = ["MomentumEncoder", "MultiheadAttention"]
