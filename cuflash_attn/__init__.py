"""cuflash_attn: FlashAttention written from scratch in CUDA C++, as a PyTorch extension.

Ops: torch.ops.cuflash_attn.fwd / .bwd (CPU and CUDA; float16, bfloat16, float32, float64).
scaled_dot_product_attention is torch's, on these ops; calls the kernels cannot run go to torch's.
"""
from .api import flash_attention, scaled_dot_product_attention
from .fallback import FallbackWarning, SDPAArgumentError, reset_sdpa_stats, sdpa_stats

__version__ = "0.1.0"
__all__ = ["flash_attention", "scaled_dot_product_attention", "sdpa_stats", "reset_sdpa_stats", "FallbackWarning",
           "SDPAArgumentError"]
