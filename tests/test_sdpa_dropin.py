"""cuflash_attn as a drop-in for torch.nn.functional.scaled_dot_product_attention: the fallback to
torch's implementation (and its warning and counts), torch's errors, the enable()/disable()
switch (also inside torch.compile'd modules), torch.autocast, CUDA graphs."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel

import cuflash_attn
from conftest import DEVICES, assert_cuda_graph_replays_bitwise, requires_cuda
from cuflash_attn.fallback import TORCH_SDPA

ops = torch.ops.cuflash_attn


@pytest.fixture(autouse=True)
def _fresh_stats():
    """Each test starts with zero counts, no reason warned about yet, and the switch off."""
    cuflash_attn.reset_sdpa_stats()
    before = F.scaled_dot_product_attention
    yield
    F.scaled_dot_product_attention = before
    assert not cuflash_attn.is_enabled()


def rand(*shape, device="cpu", dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, device=device, dtype=dtype, requires_grad=requires_grad)


def qkv(device="cpu", dtype=torch.float32, b=2, h=4, nq=16, nk=24, d=16, requires_grad=False):
    return [rand(b, h, n, d, device=device, dtype=dtype, requires_grad=requires_grad) for n in (nq, nk, nk)]


def _fallback_cases():
    """(id, inputs(device) -> (args, kwargs), the reason's pattern): calls torch's SDPA computes
    and the kernels cannot."""
    def std(**kwargs):
        return lambda device: (qkv(device), kwargs)

    def shapes(q, k, v, **kwargs):
        return lambda device: ([rand(*s, device=device) for s in (q, k, v)], kwargs)

    return [
        ("is_causal with attn_mask", lambda device: (
            qkv(device), dict(attn_mask=torch.rand(16, 24, device=device) > 0.3, is_causal=True)),
         r"is_causal together with attn_mask"),
        ("value head_dim", shapes((2, 4, 16, 16), (2, 4, 24, 16), (2, 4, 24, 8)), r"value with a head_dim"),
        ("head_dim 320", shapes((1, 2, 8, 320), (1, 2, 8, 320), (1, 2, 8, 320)), r"head_dim outside \[1, 256\]"),
        ("head_dim 0", shapes((1, 2, 8, 0), (1, 2, 8, 0), (1, 2, 8, 0)), r"head_dim outside"),
        ("dropout_p 1", std(dropout_p=1.0), r"dropout_p = 1"),
        ("scale nan", std(scale=math.nan), r"scale that is not finite"),
        ("scale inf", std(scale=math.inf), r"scale that is not finite"),
        ("scale tensor", std(scale=torch.tensor(0.3)), r"a scale of type Tensor"),
        ("batch broadcast", shapes((2, 4, 16, 16), (1, 4, 24, 16), (1, 4, 24, 16)), r"leading dimensions"),
        ("heads broadcast", shapes((2, 4, 16, 16), (2, 1, 24, 16), (2, 1, 24, 16)), r"leading dimensions"),
        ("ranks differ", shapes((2, 4, 16, 16), (4, 24, 16), (4, 24, 16)), r"numbers of dimensions"),
        ("gqa key and value heads differ", shapes((2, 4, 16, 16), (2, 2, 24, 16), (2, 4, 24, 16), enable_gqa=True),
         r"key and value with different numbers of heads"),
    ]


FALLBACK_CASES = _fallback_cases()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,inputs,pattern", FALLBACK_CASES, ids=[c[0] for c in FALLBACK_CASES])
def test_fallback_matches_torch_and_warns_once(device, name, inputs, pattern):
    args, kwargs = inputs(device)
    with pytest.warns(cuflash_attn.FallbackWarning, match=pattern):
        got = cuflash_attn.scaled_dot_product_attention(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cuflash_attn.FallbackWarning)  # once per reason
        again = cuflash_attn.scaled_dot_product_attention(*args, **kwargs)
    expected = TORCH_SDPA(*args, **kwargs)
    for result in (got, again):  # bitwise, NaN where torch's has NaN (a NaN scale)
        torch.testing.assert_close(result, expected, rtol=0, atol=0, equal_nan=True)
    stats = cuflash_attn.sdpa_stats()
    assert stats["cuflash_attn"] == 0 and list(stats["fallback"].values()) == [2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_float32_mask_beside_a_16bit_query_runs_in_float32(device, dtype):
    """The kernels add a float mask in query's dtype: a float32 bias rounded to 16 bits would move
    the scores (here a bias near -1000 by up to 4), so such a call runs on the kernels in float32,
    its results rounded once to query's dtype (torch 2.11's CUDA backends gave NaN rows for it).
    Beside a float32 or float64 query a float32 mask widens exactly."""
    q, k, v = qkv(device, dtype, requires_grad=True)
    mask = (rand(16, 24, device=device) - 1000).requires_grad_()
    dout = rand(2, 4, 16, 16, device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cuflash_attn.FallbackWarning)
        out = cuflash_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        rounded = cuflash_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask.detach().to(dtype))
    got = (out, *torch.autograd.grad(out, (q, k, v, mask), dout))
    wide = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
    ref_out = F.scaled_dot_product_attention(*wide[:3], attn_mask=wide[3])
    want = (ref_out, *torch.autograd.grad(ref_out, wide, dout.double()))
    ulp = torch.finfo(dtype).eps
    for name, g, w in zip(("out", "dq", "dk", "dv", "dmask"), got, want):
        assert g.dtype == (torch.float32 if name == "dmask" else dtype), name
        # one rounding to dtype, beside float32's error at scores near -1000 (an ulp there: 6e-5)
        torch.testing.assert_close(g.double(), w, rtol=ulp, atol=2e-4 * w.abs().max().item(), msg=name)
    assert (rounded.double() - ref_out).abs().max() > 10 * ulp * ref_out.abs().max()  # what widening avoids
    with warnings.catch_warnings():
        warnings.simplefilter("error", cuflash_attn.FallbackWarning)
        for query_dtype in (torch.float32, torch.float64):
            wide = [t.detach().to(query_dtype) for t in (q, k, v)]
            got = cuflash_attn.scaled_dot_product_attention(*wide, attn_mask=mask.detach())
            want = TORCH_SDPA(*(t.double() for t in wide), attn_mask=mask.detach().double())
            # float32 scores near -1000 keep ~6e-5 (an ulp there): torch's float32 SDPA as well.
            tolerance = 2e-4 if query_dtype == torch.float32 else 1e-12
            torch.testing.assert_close(got.double(), want, rtol=0, atol=tolerance)
    assert cuflash_attn.sdpa_stats() == {"cuflash_attn": 4, "fallback": {}}


@requires_cuda
def test_fallback_cuda_grid_limit():
    q, k, v = qkv("cuda", torch.bfloat16, b=70000, h=1, nq=4, nk=4, d=8)
    # torch's fused CUDA backends have the same grid limit (pytorch issue 142228); math has none.
    with sdpa_kernel(SDPBackend.MATH):
        with pytest.warns(cuflash_attn.FallbackWarning, match=r"batch or heads above 65535 on CUDA"):
            got = cuflash_attn.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert torch.equal(got, TORCH_SDPA(q, k, v, is_causal=True))


def test_fallback_nested_tensors():
    q, k, v = (torch.nested.nested_tensor([rand(n, 2, 8) for n in (5, 7)], layout=torch.jagged).transpose(1, 2)
               for _ in range(3))
    with pytest.warns(cuflash_attn.FallbackWarning, match=r"nested tensors"):
        got = cuflash_attn.scaled_dot_product_attention(q, k, v)
    for a, b in zip(got.unbind(), TORCH_SDPA(q, k, v).unbind()):
        assert torch.equal(a, b)


def test_fallback_tensor_subclass_keeps_torch_function():
    class Tagged(torch.Tensor):
        pass

    q, k, v = (t.as_subclass(Tagged) for t in qkv())
    with pytest.warns(cuflash_attn.FallbackWarning, match=r"__torch_function__"):
        got = cuflash_attn.scaled_dot_product_attention(q, k, v)
    assert type(got) is Tagged and torch.equal(got, TORCH_SDPA(q, k, v))


def test_torch_function_modes_keep_the_kernels():
    """A TorchFunctionMode (torch.device's context is one) is not a subclass: the kernels run."""
    q, k, v = (torch.nn.Parameter(t) for t in qkv())
    with torch.device("cpu"):
        got = cuflash_attn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert cuflash_attn.sdpa_stats() == {"cuflash_attn": 1, "fallback": {}}
    torch.testing.assert_close(got, TORCH_SDPA(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)


def test_fallback_forward_mode_ad():
    """The ops have no forward-mode derivative (they would drop the tangent): torch's has one."""
    import torch.autograd.forward_ad as fwAD

    q, k, v = qkv(dtype=torch.float64)
    tangent = torch.randn_like(q)
    results = []
    for fn in (cuflash_attn.scaled_dot_product_attention, TORCH_SDPA):
        with sdpa_kernel(SDPBackend.MATH), fwAD.dual_level(), warnings.catch_warnings():
            warnings.simplefilter("ignore", cuflash_attn.FallbackWarning)
            out = fn(fwAD.make_dual(q, tangent), k, v, is_causal=True)
            results.append(fwAD.unpack_dual(out))
    assert torch.equal(results[0].primal, results[1].primal)
    assert torch.equal(results[0].tangent, results[1].tangent)
    assert cuflash_attn.sdpa_stats()["fallback"] == {"forward-mode AD (dual tensors)": 1}


@pytest.mark.parametrize("transform", ["vmap", "grad", "jvp"])
def test_fallback_torch_func_transforms(transform):
    q, k, v = qkv(dtype=torch.float64, b=3)
    results = []
    for fn in (cuflash_attn.scaled_dot_product_attention, TORCH_SDPA):
        attention = lambda q, k, v: fn(q, k, v, is_causal=True)  # noqa: E731
        with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
            warnings.simplefilter("ignore", cuflash_attn.FallbackWarning)
            if transform == "vmap":
                results.append(torch.func.vmap(attention)(q, k, v))
            elif transform == "grad":
                results.append(torch.func.grad(lambda q: attention(q, k, v).square().sum())(q))
            else:
                results.append(torch.func.jvp(lambda q: attention(q, k, v), (q,), (torch.ones_like(q),))[1])
    assert torch.equal(results[0], results[1])
    stats = cuflash_attn.sdpa_stats()  # jvp's inputs are dual tensors, which is found first
    assert stats["cuflash_attn"] == 0 and set(stats["fallback"]) <= {
        "a torch.func transform (vmap, grad, jvp, ...)", "forward-mode AD (dual tensors)"}


def test_fallback_warns_once_per_reason_and_counts():
    q, k, v = qkv()
    mask = torch.ones(16, 24, dtype=torch.bool)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            cuflash_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
            cuflash_attn.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
            cuflash_attn.scaled_dot_product_attention(q, k, v, is_causal=True)
    messages = [str(w.message) for w in caught if w.category is cuflash_attn.FallbackWarning]
    assert len(messages) == 2 and "attn_mask" in messages[0] and "dropout_p = 1" in messages[1]
    assert all(w.filename == __file__ for w in caught)  # points at the caller
    stats = cuflash_attn.sdpa_stats()
    assert stats["cuflash_attn"] == 3 and sorted(stats["fallback"].values()) == [3, 3]
    cuflash_attn.reset_sdpa_stats()
    assert cuflash_attn.sdpa_stats() == {"cuflash_attn": 0, "fallback": {}}
    with pytest.warns(cuflash_attn.FallbackWarning, match="attn_mask"):  # again after a reset
        cuflash_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)


def _error_cases():
    """(id, args, kwargs): input torch's SDPA rejects; the fallback hands it to torch, which raises."""
    q, k, v = qkv()
    return [
        ("mixed dtypes", (q, k.double(), v), {}),
        ("int32", (q.int(), k.int(), v.int()), {}),
        ("complex64", (q.cfloat(), k.cfloat(), v.cfloat()), {}),
        ("rank 1", (q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), {}),
        ("heads without enable_gqa", (q, k[:, :2], v[:, :2]), {}),
        ("heads not a multiple", (q, k[:, :3], v[:, :3]), dict(enable_gqa=True)),
        ("head_dim of key", (q, k[..., :8], v), {}),
        ("batch", (q, torch.cat([k, k[:1]]), torch.cat([v, v[:1]])), {}),
        ("not a tensor", (q, [1.0], v), {}),
        ("attn_mask int32", (q, k, v), dict(attn_mask=torch.ones(16, 24, dtype=torch.int32))),
        ("attn_mask float64", (q, k, v), dict(attn_mask=torch.zeros(16, 24, dtype=torch.float64))),
        ("attn_mask float16", (q, k, v), dict(attn_mask=torch.zeros(16, 24, dtype=torch.float16))),
        ("attn_mask float16, query bfloat16", (q.bfloat16(), k.bfloat16(), v.bfloat16()),
         dict(attn_mask=torch.zeros(16, 24, dtype=torch.float16))),
        ("attn_mask shape", (q, k, v), dict(attn_mask=torch.ones(15, 24, dtype=torch.bool))),
        ("scale positional", (q, k, v, None, 0.0, False, 0.5), {}),
        ("scale str", (q, k, v), dict(scale="0.5")),
        ("is_causal str", (q, k, v), dict(is_causal="yes")),
        ("enable_gqa int", (q, k, v), dict(enable_gqa=1)),
    ]


ERROR_CASES = _error_cases()


def _through_the_switch(*args, **kwargs):
    with cuflash_attn.enable():
        return F.scaled_dot_product_attention(*args, **kwargs)


SDPA_ROUTES = {"direct": cuflash_attn.scaled_dot_product_attention, "enable()": _through_the_switch}


@pytest.mark.parametrize("route", list(SDPA_ROUTES))
@pytest.mark.parametrize("name,args,kwargs", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_raises_what_torch_raises(route, name, args, kwargs):
    with pytest.raises(Exception) as expected:
        TORCH_SDPA(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cuflash_attn.FallbackWarning)  # an error is not a fallback
        with pytest.raises(type(expected.value)) as got:
            SDPA_ROUTES[route](*args, **kwargs)
    assert str(got.value).replace("cuflash_attn.", "") == str(expected.value).replace("torch._C._nn.", "")
    assert cuflash_attn.sdpa_stats() == {"cuflash_attn": 0, "fallback": {}}


def _mixed_device_cases():
    """(id, args, kwargs) with CUDA and CPU tensors in one call (built on first use: CUDA ones)."""
    q, k, v = qkv("cuda")
    mask = torch.rand(16, 24) > 0.3
    return [("key on the CPU", (q, k.cpu(), v), {}), ("value on the CPU", (q, k, v.cpu()), {}),
            ("query on the CPU", (q.cpu(), k, v), {}), ("attn_mask on the CPU", (q, k, v), dict(attn_mask=mask)),
            ("float attn_mask on the CPU", (q, k, v), dict(attn_mask=mask.float())),
            ("GQA, key on the CPU", (q, k[:, :2].cpu(), v[:, :2]), dict(enable_gqa=True))]


MIXED_DEVICE_IDS = ["key", "value", "query", "bool_mask", "float_mask", "gqa_key"]


@requires_cuda
@pytest.mark.parametrize("route", list(SDPA_ROUTES))
@pytest.mark.parametrize("case", range(len(MIXED_DEVICE_IDS)), ids=MIXED_DEVICE_IDS)
def test_mixed_devices_raise_what_torch_raises(route, case):
    """A CUDA query with a CPU key, value or mask (or the reverse): the exception torch's SDPA
    raises, type and message, never a kernel reading host memory, nothing counted as ours; where
    torch accepts the mix (its own device moves), the same result as torch's."""
    _, args, kwargs = _mixed_device_cases()[case]
    try:
        expected, torch_error = TORCH_SDPA(*args, **kwargs), None
    except Exception as error:  # noqa: BLE001  (whatever torch raises is the expectation)
        torch_error = error
    if torch_error is None:
        torch.testing.assert_close(SDPA_ROUTES[route](*args, **kwargs), expected)
        return
    with pytest.raises(type(torch_error)) as got:
        SDPA_ROUTES[route](*args, **kwargs)
    assert str(got.value).replace("cuflash_attn.", "") == str(torch_error).replace("torch._C._nn.", "")
    assert cuflash_attn.sdpa_stats()["cuflash_attn"] == 0


OWN_ERROR_CASES = [
    ("dropout_p -0.1", dict(dropout_p=-0.1), r"dropout_p must be in \[0, 1\], got -0.1"),
    ("dropout_p 1.5", dict(dropout_p=1.5), r"dropout_p must be in \[0, 1\], got 1.5"),
    ("dropout_p nan", dict(dropout_p=math.nan), r"dropout_p must be in \[0, 1\], got nan"),
]


@pytest.mark.parametrize("route", list(SDPA_ROUTES))
@pytest.mark.parametrize("name,kwargs,pattern", OWN_ERROR_CASES, ids=[c[0] for c in OWN_ERROR_CASES])
def test_invalid_dropout_raises_a_runtime_error_as_torch(route, name, kwargs, pattern):
    with pytest.raises(cuflash_attn.SDPAArgumentError, match=pattern) as info:
        SDPA_ROUTES[route](*qkv(), **kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    with pytest.raises(RuntimeError):
        TORCH_SDPA(*qkv(), **kwargs)


def test_key_and_value_lengths_differ_raises():
    """torch 2.11's CPU flash backend reads out of bounds here (heap corruption when value is the
    longer one), so torch is not called to compare."""
    q, k, _ = qkv()
    with pytest.raises(cuflash_attn.SDPAArgumentError, match=r"key and value must have the same sequence length, "
                                                             r"got 24 and 9"):
        cuflash_attn.scaled_dot_product_attention(q, k, rand(2, 4, 9, 16), attn_mask=torch.ones(16, 24).bool())


def test_output_strides_as_torchs():
    """A 4-dimensional query's layout carries to the output, as in torch; other ranks give a
    contiguous output, as torch's math backend does (`out.view(...)` works alike)."""
    for q in (rand(5, 3, 8).transpose(0, 1), rand(2, 5, 3, 8).transpose(1, 2), rand(2, 2, 5, 3, 8).transpose(2, 3),
              rand(8, 5).t()):
        k = torch.randn_like(q)
        assert cuflash_attn.scaled_dot_product_attention(q, k, k).stride() == TORCH_SDPA(q, k, k).stride()


@pytest.mark.parametrize("heads_k,heads_v", [(0, 0), (0, 3), (3, 0)])
def test_gqa_with_no_key_or_value_heads_raises(heads_k, heads_v):
    """torch 2.11's CPU backend divides by the key or value heads (the process dies of SIGFPE), so
    torch is not called to compare, nor taken as the fallback for heads that differ."""
    q, k, v = qkv(), rand(2, heads_k, 24, 16), rand(2, heads_v, 24, 16)
    with pytest.raises(cuflash_attn.SDPAArgumentError,
                       match=f"at least one head under enable_gqa, got {heads_k} and {heads_v}"):
        cuflash_attn.scaled_dot_product_attention(q[0], k, v, enable_gqa=True)
    with pytest.raises(cuflash_attn.SDPAArgumentError), cuflash_attn.enable():
        torch.nn.functional.scaled_dot_product_attention(q[0], k, v, enable_gqa=True)


@pytest.mark.parametrize("shapes", [((1, 1, 2, 3, 4), (1, 1, 2, 0, 4)), ((2, 2, 0, 3, 4), (2, 2, 0, 3, 4)),
                                    ((2, 0, 2, 3, 4), (2, 0, 2, 3, 4))], ids=["no keys", "no heads", "empty lead"])
def test_more_than_4_dimensions_with_a_zero_size(shapes):
    q = rand(*shapes[0], requires_grad=True)
    k, v = (rand(*shapes[1], requires_grad=True) for _ in range(2))
    mask = torch.zeros(shapes[0][-2], shapes[1][-2])
    for kwargs in ({}, {"attn_mask": mask}):
        out = cuflash_attn.scaled_dot_product_attention(q, k, v, **kwargs)
        assert torch.equal(out, TORCH_SDPA(q, k, v, **kwargs))
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        assert all(g is None or not g.any() for g in grads)
    assert cuflash_attn.sdpa_stats() == {"cuflash_attn": 2, "fallback": {}}


# The switch ------------------------------------------------------------------------------------

def test_enable_disable_restore_exactly():
    original = F.scaled_dot_product_attention
    assert original is TORCH_SDPA and not cuflash_attn.is_enabled()
    cuflash_attn.enable()
    assert F.scaled_dot_product_attention is cuflash_attn.scaled_dot_product_attention
    cuflash_attn.enable()  # idempotent
    assert cuflash_attn.is_enabled()
    cuflash_attn.disable()
    assert F.scaled_dot_product_attention is original
    cuflash_attn.disable()
    assert F.scaled_dot_product_attention is original


def test_disable_after_a_hand_installed_switch_puts_torchs_back():
    from cuflash_attn import switch
    displaced, switch._displaced = switch._displaced, None  # as in a fresh process
    try:
        F.scaled_dot_product_attention = cuflash_attn.scaled_dot_product_attention
        cuflash_attn.disable()
        assert F.scaled_dot_product_attention is TORCH_SDPA
    finally:
        switch._displaced = displaced


def test_context_managers_nest_and_restore_on_error():
    original = F.scaled_dot_product_attention
    with cuflash_attn.enable():
        assert cuflash_attn.is_enabled()
        with cuflash_attn.disable():
            assert F.scaled_dot_product_attention is original
            with cuflash_attn.enable():
                assert cuflash_attn.is_enabled()
            assert not cuflash_attn.is_enabled()
        assert cuflash_attn.is_enabled()
        with cuflash_attn.enable():
            pass
        assert cuflash_attn.is_enabled()  # the inner block found it on and leaves it on
    assert F.scaled_dot_product_attention is original
    with pytest.raises(KeyError):
        with cuflash_attn.enable():
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is original


def test_switch_puts_back_another_patch():
    """Someone else's wrapper installed before enable() is what disable() brings back."""
    def wrapper(*args, **kwargs):
        return TORCH_SDPA(*args, **kwargs)

    F.scaled_dot_product_attention = wrapper
    with cuflash_attn.enable():
        assert cuflash_attn.is_enabled()
    assert F.scaled_dot_product_attention is wrapper
    cuflash_attn.enable()
    cuflash_attn.disable()
    assert F.scaled_dot_product_attention is wrapper


class Attention(torch.nn.Module):
    """Looks torch's SDPA up when it calls, as HuggingFace transformers' sdpa attention does."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(b, n, -1)


@pytest.mark.parametrize("device", DEVICES)
def test_enable_routes_module_calls(device):
    model = Attention().to(device)
    x = rand(2, 33, 64, device=device)
    expected = model(x)
    with cuflash_attn.enable():
        got = model(x)
        mha = torch.nn.MultiheadAttention(64, 4, batch_first=True, device=device)
        mha(x, x, x, need_weights=False)  # F.multi_head_attention_forward's own lookup
    assert cuflash_attn.sdpa_stats() == {"cuflash_attn": 2, "fallback": {}}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _graph_calls(gm):
    return {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("device", DEVICES)
def test_enable_inside_torch_compile(device):
    """The switch is read while tracing and guarded: a compiled module follows it, recompiling
    when it changes."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(_graph_calls(gm))
        return gm.forward

    model = Attention().to(device)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = rand(2, 33, 64, device=device, requires_grad=True)
    with cuflash_attn.enable():
        got = compiled(x)
        got.sum().backward()
    expected = compiled(x)
    assert len(graphs) == 2
    assert any("cuflash_attn.fwd" in c for c in graphs[0]) and not any("cuflash_attn" in c for c in graphs[1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with cuflash_attn.enable():
        compiled(x)  # the first graph again, no third compilation
    assert len(graphs) == 2


# torch.compile -----------------------------------------------------------------------------------

def _sdpa_step(fn, q, k, v, dout):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def _gqa_sdpa(q, k, v):
    return cuflash_attn.scaled_dot_product_attention(q * 2, k, v, is_causal=True, enable_gqa=True).sin()


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_compile_dynamic_fullgraph_forward_backward(device):
    """fullgraph=True raises on any graph break; dynamic=True: one compilation for every shape
    (sizes > 1, as dynamo specializes 0 and 1, and all different in the first call, else duck
    sizing guards on their equality). Counted as graphs: dynamo restarts the first trace once, to
    specialize the float defaults (dropout_p=0.0) it traced as symbols."""
    counters.clear()
    compiled = torch.compile(_gqa_sdpa, fullgraph=True, dynamic=True)
    for b, h, nq, nk in [(3, 4, 17, 33), (5, 6, 40, 29), (2, 8, 64, 64)]:
        q = rand(b, h, nq, 32, device=device, requires_grad=True)
        k, v = (rand(b, 2, nk, 32, device=device, requires_grad=True) for _ in range(2))
        dout = rand(b, h, nq, 32, device=device)
        for e, c in zip(_sdpa_step(_gqa_sdpa, q, k, v, dout), _sdpa_step(compiled, q, k, v, dout)):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    stats = cuflash_attn.sdpa_stats()  # 3 eager calls, and the trace (twice: the restart)
    assert stats["fallback"] == {} and stats["cuflash_attn"] in (4, 5)


def test_sdpa_compile_fallback_fullgraph():
    """The fallback, its warning and its count do not break the graph either."""
    def no_dropout(q, k, v):
        return cuflash_attn.scaled_dot_product_attention(q, k, v, dropout_p=1.0) + 1

    q, k, v = qkv()
    with pytest.warns(cuflash_attn.FallbackWarning, match="dropout_p = 1"):
        got = torch.compile(no_dropout, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(got, TORCH_SDPA(q, k, v, dropout_p=1.0) + 1)
    assert cuflash_attn.sdpa_stats()["fallback"] == {"dropout_p = 1": 1}


# torch.autocast ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_casts_like_torch_sdpa(device, dtype):
    q, k, v = qkv(device, requires_grad=True)
    with torch.autocast(device, dtype=dtype):
        out, lse = ops.fwd(q, k, v, None, True)
        sdpa = cuflash_attn.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch_sdpa = TORCH_SDPA(q, k, v, is_causal=True)
    assert out.dtype == sdpa.dtype == torch_sdpa.dtype == dtype and lse.dtype == torch.float32
    casted = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    expected, expected_lse = ops.fwd(*casted, None, True)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse) and torch.equal(sdpa, expected)
    dout = torch.randn_like(expected)
    grads = torch.autograd.grad(sdpa, (q, k, v), dout)
    expected_grads = torch.autograd.grad(expected, casted, dout)
    for g, e in zip(grads, expected_grads):
        assert g.dtype == torch.float32 and torch.equal(g, e.float())


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_inputs_of_mixed_dtypes_on_the_kernels(device):
    """transformers 5 hands SDPA float32 query and key with a bfloat16 value under autocast:
    autocast makes them one dtype, so the kernels run them (torch's SDPA accepts them too)."""
    q, k = qkv(device, torch.float32)[:2]
    v = rand(2, 4, 24, 16, device=device, dtype=torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = cuflash_attn.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel(SDPBackend.MATH):
            want = TORCH_SDPA(q, k, v, is_causal=True)
    assert cuflash_attn.sdpa_stats() == {"cuflash_attn": 1, "fallback": {}}
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_casts_a_float_attn_mask_with_q(device):
    """The op takes a float mask in q's dtype: autocast casts it with q, k, v, as torch's SDPA."""
    q, k, v = qkv(device)
    mask = torch.randn(16, 24, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, _ = ops.fwd(q, k, v, attn_mask=mask)
    expected, _ = ops.fwd(*(t.bfloat16() for t in (q, k, v)), attn_mask=mask.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_leaves_float64_and_alibi_alone(device):
    q, k, v = qkv(device, torch.float64)
    slopes = torch.rand(4, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = cuflash_attn.flash_attention(q, k, v, causal=True, alibi_slopes=slopes)
        low = cuflash_attn.flash_attention(*(t.float() for t in (q, k, v)), causal=True, alibi_slopes=slopes)
    assert out.dtype == torch.float64 and low.dtype == torch.bfloat16
    assert torch.equal(out, cuflash_attn.flash_attention(q, k, v, causal=True, alibi_slopes=slopes))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_inside_torch_compile(device):
    def fn(q, k, v):
        with torch.autocast(device, dtype=torch.bfloat16):
            return cuflash_attn.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = qkv(device)
    got = torch.compile(fn, fullgraph=True)(q, k, v)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ops.fwd(*(t.bfloat16() for t in (q, k, v)), None, True)[0])


@requires_cuda
def test_autocast_of_another_device_type_does_nothing():
    q, k, v = qkv("cuda")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cuflash_attn.scaled_dot_product_attention(q, k, v).dtype == torch.float32


# CUDA graphs -------------------------------------------------------------------------------------

@requires_cuda
def test_sdpa_cuda_graph_capture_forward_backward_bitwise():
    """The switch on, through torch.nn.functional, with GQA and folded (N, ...) dimensions."""
    q = rand(2, 3, 4, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (rand(2, 3, 2, 280, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)

    def step():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    with cuflash_attn.enable():
        assert_cuda_graph_replays_bitwise(step)
    assert cuflash_attn.sdpa_stats()["fallback"] == {}
