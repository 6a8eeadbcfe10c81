"""cuflash_attn: FlashAttention written from scratch in CUDA C++, as a PyTorch extension.

Ops: torch.ops.cuflash_attn.fwd / .bwd (CPU and CUDA; float16, bfloat16, float32, float64).
Drop-in for torch's SDPA: cuflash_attn.enable() routes torch.nn.functional.scaled_dot_product_attention
here (also `with cuflash_attn.enable():`); calls the kernels cannot run fall back to torch's.
"""
from . import autocast  # noqa: F401  (registers torch.autocast's rule for the forward op)
from .api import flash_attention, scaled_dot_product_attention
from .fallback import FallbackWarning, SDPAArgumentError, reset_sdpa_stats, sdpa_stats
from .switch import disable, enable, is_enabled

__version__ = "0.1.0"
__all__ = ["flash_attention", "scaled_dot_product_attention", "enable", "disable", "is_enabled", "sdpa_stats",
           "reset_sdpa_stats", "FallbackWarning", "SDPAArgumentError"]
