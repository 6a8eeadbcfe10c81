"""Streams and devices: forward and backward launched interleaved on 8 concurrent CUDA streams
equal the serial results bitwise (the kernels use the current stream and share no state), every
entry point's kernels wait for work pending on the current stream, and inputs on a GPU other than
the current device run on that GPU with the same results."""
import pytest
import torch

import cuflash_attn
from cuflash_attn import flash_attn_interface as fa
from conftest import ENTRIES, entry_call, requires_cuda

pytestmark = requires_cuda

# (dtype, batch, heads, seqlen_q, seqlen_k, head_dim, causal): every kernel family, big enough
# for the launches of different streams to overlap.
STREAM_CASES = [
    (torch.bfloat16, 2, 8, 1024, 1024, 128, True),
    (torch.float16, 4, 4, 777, 1500, 64, False),
    (torch.bfloat16, 1, 16, 513, 257, 256, False),
    (torch.float16, 2, 8, 1000, 1000, 59, True),
    (torch.float32, 2, 4, 600, 700, 64, True),
    (torch.bfloat16, 8, 2, 300, 2048, 96, False),
    (torch.float64, 1, 4, 300, 333, 32, True),
    (torch.float16, 2, 6, 2048, 129, 160, False),
]


def make_case(i, device):
    dtype, b, h, nq, nk, d, causal = STREAM_CASES[i]
    g = torch.Generator().manual_seed(i)
    q, k, v, dout = (torch.randn(b, h, n, d, generator=g).to(device, dtype) for n in (nq, nk, nk, nq))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout, causal


def forward(q, k, v, causal):
    return cuflash_attn.flash_attention(q, k, v, causal=causal, return_lse=True)


def backward(out, q, k, v, dout):
    return torch.autograd.grad(out, (q, k, v), dout)


def test_eight_concurrent_streams_match_serial_bitwise():
    cases = [make_case(i, "cuda") for i in range(len(STREAM_CASES))]
    serial = []
    for q, k, v, dout, causal in cases:
        out, lse = forward(q, k, v, causal)
        serial.append((out, lse, *backward(out, q, k, v, dout)))
    torch.cuda.synchronize()

    main = torch.cuda.current_stream()
    streams = [torch.cuda.Stream() for _ in cases]
    for _ in range(3):
        for stream, (q, k, v, dout, _) in zip(streams, cases):
            stream.wait_stream(main)  # the inputs were written on the main stream
            for t in (q, k, v, dout):
                t.record_stream(stream)
        fwd = []
        for stream, (q, k, v, _, causal) in zip(streams, cases):  # all forwards, then all backwards
            with torch.cuda.stream(stream):
                fwd.append(forward(q, k, v, causal))
        results = []
        for stream, (q, k, v, dout, _), (out, lse) in zip(streams, cases, fwd):
            with torch.cuda.stream(stream):
                results.append((out, lse, *backward(out, q, k, v, dout)))
        for stream, result in zip(streams, results):
            main.wait_stream(stream)
            for t in result:  # made on `stream`, read (and freed) on the main stream
                t.record_stream(main)
        for i, (got, expected) in enumerate(zip(results, serial)):
            for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
                assert torch.equal(a, b), f"case {i} {STREAM_CASES[i]}: {name} on a side stream differs from serial"
    torch.cuda.synchronize()


def test_every_entry_point_on_eight_concurrent_streams_matches_serial():
    """The public entry points (conftest's entry_call: the op with its backward, flash_attn_func
    with GQA and a window, the varlen one, the KV cache with paged keys split 5 ways, the SDPA
    drop-in), each on its own stream, 8 at once, equal their serial results bitwise."""
    calls = [entry_call(ENTRIES[i % len(ENTRIES)], "cuda", 4 + i) for i in range(8)]
    serial = [call() for call in calls]
    torch.cuda.synchronize()
    main = torch.cuda.current_stream()
    streams = [torch.cuda.Stream() for _ in calls]
    for _ in range(3):
        results = []
        for stream, call in zip(streams, calls):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                results.append(call())
        for stream, result in zip(streams, results):
            main.wait_stream(stream)
            for t in result:  # made on `stream`, read (and freed) on the main stream
                t.record_stream(main)
        for i, (got, expected) in enumerate(zip(results, serial)):
            for j, (a, b) in enumerate(zip(got, expected)):
                assert torch.equal(a, b), f"{ENTRIES[i % len(ENTRIES)]} on stream {i}: result {j} differs from serial"
    torch.cuda.synchronize()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("i", [0, 4])
def test_inputs_on_a_gpu_other_than_the_current_device(i):
    q, k, v, dout, causal = make_case(i, "cuda:1")
    with torch.cuda.device(1):
        out, lse = forward(q, k, v, causal)
        expected = (out, lse, *backward(out, q, k, v, dout))
    torch.cuda.set_device(0)
    out, lse = forward(q, k, v, causal)
    got = (out, lse, *backward(out, q, k, v, dout))
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0, "the op changed the current device"
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        assert a.device == torch.device("cuda:1"), f"{name} is on {a.device}"
        assert torch.equal(a, b), f"{name} computed with cuda:0 current differs"


def _attend_padded(q, k, v, dout):
    out, lse = cuflash_attn.flash_attention(q, k, v, causal=True, return_lse=True)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))


def _attend_packed(q, k, v, dout, cu_seqlens):
    out = fa.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, 300, 300, causal=True)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def _attend_cache(q, k_cache, v_cache, k_new, v_new, cache_seqlens):
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=cache_seqlens,
                                          causal=True, return_softmax_lse=True)
    return out, lse, k_cache, v_cache  # the new keys are appended in place


def _stream_entry(name):
    """The entry point's call and its inputs (float ones that take gradients first)."""
    g = torch.Generator().manual_seed(7)
    rand = lambda *shape: torch.randn(*shape, generator=g).to("cuda", torch.bfloat16)  # noqa: E731
    if name == "flash_attention":
        return _attend_padded, [rand(2, 4, 700, 64) for _ in range(4)], 3
    if name == "flash_attn_varlen_func":
        cu_seqlens = torch.tensor([0, 300, 300, 555], dtype=torch.int32, device="cuda")
        return _attend_packed, [rand(555, 4, 128) for _ in range(4)] + [cu_seqlens], 3
    cache_seqlens = torch.tensor([5, 900, 0], dtype=torch.int32, device="cuda")
    return (_attend_cache, [rand(3, 2, 8, 128), rand(3, 1024, 2, 128), rand(3, 1024, 2, 128), rand(3, 2, 2, 128),
                            rand(3, 2, 2, 128), cache_seqlens], 0)


@pytest.mark.parametrize("name", ["flash_attention", "flash_attn_varlen_func", "flash_attn_with_kvcache"])
def test_kernels_run_on_the_current_stream_behind_its_pending_work(name):
    """Inputs written on a side stream behind ~30 ms of spinning (torch.cuda._sleep), the call
    made on that stream at once: the forward and backward (autograd runs it on the forward's
    stream) must read them after the copy and equal a serial run bitwise. A kernel launched on
    another stream (the legacy default one, or a stream of the library's own: torch's are
    non-blocking, so neither waits) would run during the spin and read the NaN or zero lengths
    written before it. The stream test above cannot catch that: its inputs are ready before
    any stream starts."""
    call, inputs, with_grad = _stream_entry(name)
    fresh = lambda ts: [t.clone().requires_grad_(i < with_grad) for i, t in enumerate(ts)]  # noqa: E731
    expected = call(*fresh(inputs))
    torch.cuda.synchronize()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # inputs made on the current stream
    with torch.cuda.stream(stream):
        late = [torch.empty_like(t) for t in inputs]
        for t in late:
            t.fill_(float("nan") if t.is_floating_point() else 0)
        torch.cuda._sleep(50_000_000)
        for t, source in zip(late, inputs):
            t.copy_(source)
        got = call(*[t.requires_grad_(i < with_grad) for i, t in enumerate(late)])
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"{name}: result {i} differs from the serial run's"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("name", ENTRIES)
def test_every_entry_point_on_a_gpu_other_than_the_current_device(name):
    """conftest's entry_call with its inputs on cuda:1 while cuda:0 is current: results on cuda:1,
    bitwise equal to the same call with cuda:1 current."""
    call = entry_call(name, "cuda:1", 3)
    with torch.cuda.device(1):
        expected = call()
    got = call()
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.device == torch.device("cuda:1"), f"{name}: result {i} on {a.device}"
        assert torch.equal(a, b), f"{name}: result {i} differs with cuda:0 current"
