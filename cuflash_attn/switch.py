"""The one-line switch: torch.nn.functional.scaled_dot_product_attention -> cuflash_attn.

    cuflash_attn.enable()            # from now on (until disable())
    with cuflash_attn.enable(): ...  # inside the block; what was there before comes back on exit
    with cuflash_attn.disable(): ... # torch's inside the block

Both replace the attribute of the torch.nn.functional module, so code that looks it up when it
calls (torch.nn.functional.scaled_dot_product_attention(...), F.scaled_dot_product_attention,
HuggingFace transformers' sdpa attention, nn.MultiheadAttention) is routed; a reference taken
before enable() (`from torch.nn.functional import scaled_dot_product_attention`) is not.
torch.compile guards on the attribute, so a compiled module recompiles when the switch changes.
The switch is process-wide, not per thread: flip it from one thread (once at startup, or with
blocks that are entered and exited in order), not from threads that run concurrently.
"""
import threading

import torch.nn.functional as F

from . import api
from .fallback import TORCH_SDPA

_lock = threading.Lock()
_displaced = None  # what enable() replaced, which disable() puts back


class _Switch:
    """Returned by enable() and disable(): the switch is already flipped; used as a context
    manager, it restores exactly what the attribute was before, on exit."""

    def __init__(self, on: bool):
        global _displaced
        with _lock:
            self._previous = F.scaled_dot_product_attention
            if on and self._previous is not api.scaled_dot_product_attention:
                _displaced = self._previous
                F.scaled_dot_product_attention = api.scaled_dot_product_attention
            elif not on and self._previous is api.scaled_dot_product_attention:
                # (installed by hand, not by enable(): nothing displaced but torch's own)
                F.scaled_dot_product_attention = _displaced if _displaced is not None else TORCH_SDPA

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        with _lock:
            F.scaled_dot_product_attention = self._previous
        return False


def enable() -> _Switch:
    """Routes torch.nn.functional.scaled_dot_product_attention to
    cuflash_attn.scaled_dot_product_attention (which sends what its kernels cannot run back to
    torch's). A plain call lasts until disable(); `with enable():` lasts for the block."""
    return _Switch(True)


def disable() -> _Switch:
    """Puts back what enable() replaced (torch's function). A plain call lasts until enable();
    `with disable():` lasts for the block."""
    return _Switch(False)


def is_enabled() -> bool:
    """Whether torch.nn.functional.scaled_dot_product_attention is cuflash_attn's now."""
    return F.scaled_dot_product_attention is api.scaled_dot_product_attention
