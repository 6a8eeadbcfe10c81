"""Streams and devices: forward and backward launched interleaved on 8 concurrent CUDA streams
equal the serial results bitwise (the kernels use the current stream and share no state), and
inputs on a GPU other than the current device run on that GPU with the same results."""
import pytest
import torch

import cuflash_attn
from conftest import requires_cuda

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
