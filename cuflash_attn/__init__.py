"""cuflash_attn: FlashAttention written from scratch in CUDA C++, as a PyTorch extension.

Ops: torch.ops.cuflash_attn.fwd / .bwd (CPU and CUDA; float16, bfloat16, float32, float64).
"""
from .api import flash_attention, scaled_dot_product_attention

__version__ = "0.1.0"
__all__ = ["flash_attention", "scaled_dot_product_attention"]
