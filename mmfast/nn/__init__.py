"""nn.Modules that hold parameters and call mmfast's functional ops."""
from .momentum import MomentumEncoder

__all__ = ["MomentumEncoder"]
