"""What the commands that run ops (`check`, `verify`) do before mmfast.kernels is imported."""
import os


def prepare_device(parser, device):
    """Refuse ``--device cuda`` without a visible GPU; without one, run Triton through its interpreter. Must run
    before mmfast.kernels is imported: Triton decides at @jit time whether to interpret."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
