"""Operator checks: opcheck, gradcheck, torch.compile, CUDA graphs, streams, determinism."""
import pytest
import torch

import cuflash_attn
from conftest import DEVICES, assert_cuda_graph_replays_bitwise, requires_cuda

ops = torch.ops.cuflash_attn


def qkv(device, dtype, b=2, h=3, nq=37, nk=45, d=24, requires_grad=True):
    return [torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=requires_grad) for n in (nq, nk, nk)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal,bottom_right", [(False, False), (True, False), (True, True)])
def test_opcheck_fwd(device, dtype, causal, bottom_right):
    q, k, v = qkv(device, dtype)
    torch.library.opcheck(ops.fwd.default, (q, k, v),
                          {"scale": 0.3, "is_causal": causal, "bottom_right": bottom_right})


def feature_options(device, heads=3):
    """Every option of the ops at once (GQA comes from the inputs)."""
    return dict(is_causal=True, bottom_right=True, window_left=20, softcap=8.0,
                alibi_slopes=torch.rand(heads, device=device), dropout_p=0.2,
                rng_state=torch.tensor([11, 0], dtype=torch.int64, device=device))


def gqa_qkv(device, dtype, requires_grad=True, nq=37, nk=45, d=24):
    q = torch.randn(2, 4, nq, d, device=device, dtype=dtype, requires_grad=requires_grad)
    k, v = (torch.randn(2, 2, nk, d, device=device, dtype=dtype, requires_grad=requires_grad) for _ in range(2))
    return q, k, v


def varlen_qkv(device, dtype, requires_grad=True, d=16):
    cu_q = torch.tensor([0, 5, 5, 30], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 20, 22], dtype=torch.int32, device=device)
    q = torch.randn(30, 4, d, device=device, dtype=dtype, requires_grad=requires_grad)
    k, v = (torch.randn(22, 2, d, device=device, dtype=dtype, requires_grad=requires_grad) for _ in range(2))
    return (q, k, v), dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=25, max_seqlen_k=11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_opcheck_with_features(device, dtype, varlen):
    if varlen:
        (q, k, v), extra = varlen_qkv(device, dtype)
        options = dict(feature_options(device, heads=4), **extra)
    else:
        q, k, v = gqa_qkv(device, dtype)
        options = feature_options(device, heads=4)
    torch.library.opcheck(ops.fwd.default, (q, k, v), options)
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = ops.fwd(q, k, v, **options)
    torch.library.opcheck(ops.bwd.default, (torch.randn_like(out), q, k, v, out, lse, None), options)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_dropout_mask(device):
    state = torch.tensor([3, 4], dtype=torch.int64, device=device)
    torch.library.opcheck(ops.dropout_mask.default, (state, 0.3, 2, 3, 17, 29))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_gradcheck_fp64_with_features(device, varlen):
    if varlen:
        (q, k, v), extra = varlen_qkv(device, torch.float64, d=8)
        options = dict(feature_options(device, heads=4), **extra)
    else:
        q, k, v = gqa_qkv(device, torch.float64, nq=9, nk=13, d=8)
        options = dict(feature_options(device, heads=4), window_left=5)
    # Packed, some rows see no key: their lse is -inf, which has no finite difference.
    fn = lambda q, k, v: ops.fwd(q, k, v, **options)[0 if varlen else slice(None)]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_dlse", [False, True])
def test_opcheck_bwd(device, with_dlse):
    q, k, v = qkv(device, torch.float32, requires_grad=False)
    out, lse = ops.fwd(q, k, v, None, True, False)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if with_dlse else None
    torch.library.opcheck(ops.bwd.default, (dout, q, k, v, out, lse, dlse), {"scale": None, "is_causal": True})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_fp64(device, causal):
    q, k, v = qkv(device, torch.float64, b=1, h=2, nq=9, nk=13, d=8)
    fn = lambda q, k, v: cuflash_attn.flash_attention(q, k, v, causal=causal, return_lse=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64_bottom_right_with_empty_rows(device):
    """nq > nk with bottom-right alignment: the first rows see no key."""
    q, k, v = qkv(device, torch.float64, b=1, h=1, nq=11, nk=6, d=8)
    fn = lambda q, k, v: ops.fwd(q, k, v, None, True, True)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_raises(device):
    q, k, v = qkv(device, torch.float64, b=1, h=1, nq=4, nk=5, d=8)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.gradgradcheck(lambda q, k, v: cuflash_attn.flash_attention(q, k, v), (q, k, v))


def _loss_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    q, k, v = qkv(device, torch.float32)

    def fn(q, k, v):
        return cuflash_attn.flash_attention(q * 2, k, v, causal=True) + 1

    eager = _loss_and_grads(fn, q, k, v)
    compiled = _loss_and_grads(torch.compile(fn, fullgraph=True), q, k, v)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


@requires_cuda
def test_torch_compile_reduce_overhead():
    q, k, v = qkv("cuda", torch.bfloat16, requires_grad=False)
    fn = torch.compile(lambda q, k, v: cuflash_attn.flash_attention(q, k, v, causal=True),
                       mode="reduce-overhead", fullgraph=True)
    expected = cuflash_attn.flash_attention(q, k, v, causal=True)
    for _ in range(3):
        got = fn(q, k, v)
    torch.testing.assert_close(got, expected)


@requires_cuda
def test_cuda_graph_capture_and_replay_bitwise():
    q, k, v = qkv("cuda", torch.bfloat16, b=2, h=4, nq=300, nk=300, d=64)
    dout = torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        out = cuflash_attn.flash_attention(q, k, v, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    assert_cuda_graph_replays_bitwise(step)


@requires_cuda
def test_non_default_stream():
    q, k, v = qkv("cuda", torch.float16, b=4, h=4, nq=500, nk=700, d=128)
    expected = cuflash_attn.flash_attention(q, k, v)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = cuflash_attn.flash_attention(q, k, v)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(expected, got)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward_50_repeats(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = qkv(device, dtype, b=2, h=4, nq=257, nk=511, d=64)
    dout = torch.randn(2, 4, 257, 64, device=device, dtype=dtype)
    out = cuflash_attn.flash_attention(q, k, v, causal=True)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    for _ in range(50):
        again = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@requires_cuda
def test_race_large_batch_250_repeats():
    q, k, v = qkv("cuda", torch.float16, b=200, h=4, nq=256, nk=256, d=64)
    dout = torch.randn(200, 4, 256, 64, device="cuda", dtype=torch.float16)

    def run():  # dq too: on Hopper the fused backward adds it up, in a fixed order
        out, lse = ops.fwd(q, k, v, None, False, False)
        return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))

    first = run()
    for _ in range(250):
        for a, b in zip(first, run()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_lse_gradient(device):
    """lse is differentiable: d lse / d scores = P."""
    q, k, v = qkv(device, torch.float64, b=1, h=2, nq=7, nk=10, d=8)
    fn = lambda q, k, v: cuflash_attn.flash_attention(q, k, v, return_lse=True)[1]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@requires_cuda
def test_debug_switch_names_each_launch(monkeypatch, capfd):
    """CUFLASH_DEBUG=1: a stderr line per kernel launch, naming it (which path ran)."""
    q, k, v = (torch.randn(1, 2, 100, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    monkeypatch.setenv("CUFLASH_DEBUG", "1")
    out, _ = torch.ops.cuflash_attn.fwd(q, k, v, None, True, False)
    out.sum().backward()
    torch.cuda.synchronize()
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("cuflash_attn: ")]
    assert any("flash_fwd" in line and "<__half, 64" in line for line in lines), lines
    assert any("flash_bwd_dq" in line for line in lines) and any("flash_bwd_dkdv" in line for line in lines), lines
    assert all("grid (" in line and "threads" in line for line in lines), lines
    monkeypatch.setenv("CUFLASH_DEBUG", "0")
    torch.ops.cuflash_attn.fwd(q, k, v, None, True, False)
    torch.cuda.synchronize()
    assert "cuflash_attn: " not in capfd.readouterr().err
