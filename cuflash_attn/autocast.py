"""torch.autocast for the forward op, as torch does it for scaled_dot_product_attention (one of
autocast's lower-precision ops): in an autocast region of the inputs' device type, float32 and
float16/bfloat16 q, k and v are cast to the region's dtype (float64 is left alone), and the op
runs on the casted tensors. Gradients flow back through the casts to the original dtype.

A float attn_mask, where the op takes one, is cast with them (the op wants it in q's dtype;
torch casts SDPA's too). torch.library.register_autocast does not fit: it casts to one fixed
dtype, not the region's, and casts every floating tensor argument (alibi_slopes must stay
float32). The backward op needs no rule: its inputs are the forward's saved, casted, tensors.
"""
import torch

from .ops import _ops

_CAST = ("q", "k", "v", "attn_mask")
_CAST_POSITIONS = frozenset(i for i, a in enumerate(_ops.fwd.default._schema.arguments) if a.name in _CAST)
_KEYS = {"cpu": torch._C.DispatchKey.AutocastCPU, "cuda": torch._C.DispatchKey.AutocastCUDA}

_lib = torch.library.Library("cuflash_attn", "FRAGMENT")


def _autocast_kernel(device_type: str):
    excluded = torch._C.DispatchKeySet(_KEYS[device_type])

    def kernel(*args, **kwargs):
        dtype = torch.get_autocast_dtype(device_type)
        args = tuple(_cast(a, device_type, dtype) if i in _CAST_POSITIONS else a for i, a in enumerate(args))
        kwargs = {n: _cast(a, device_type, dtype) if n in _CAST else a for n, a in kwargs.items()}
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return _ops.fwd.default(*args, **kwargs)

    return kernel


def _cast(t, device_type: str, dtype: torch.dtype):
    # The tensors autocast itself would cast (at::autocast::is_eligible); None stays None.
    eligible = (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device_type
                and t.dtype != torch.float64)
    return t.to(dtype) if eligible else t


for _device_type, _key in _KEYS.items():
    _lib.impl("fwd", _autocast_kernel(_device_type), _key.name)
