"""Forward, backward and logsumexp against the float64 reference (shared/TESTING.md's rule),
over the shape list, every head dim bucket (and head dims the API pads), every dtype, causal
off and both alignments; and a seeded random sweep that draws the features too (GQA/MQA,
windows, softcap, ALiBi, dropout, packed variable-length batches) through test_features' checks."""
import os

import pytest
import torch

import test_features
from conftest import HAS_CUDA, poisoned_and_unmodified
from reference import LOW_PRECISION, assert_close_to_reference, assert_lse_close, attention_reference, gradient_scale

SHAPES = [(1, 1), (1, 239), (3, 799), (113, 203), (127, 513), (128, 217), (256, 512), (512, 256),
          (1023, 1024), (1024, 1023), (2048, 2048), (239, 1), (799, 3)]
# Every tensor-core bucket (32 ... 256), head dims inside a bucket, and ones not a multiple of 8.
CUDA_HEAD_DIMS = [32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]
CPU_HEAD_DIMS = [32, 59, 128]
CPU_MAX_PAIRS = 300_000  # the plain CPU kernels keep CI short: larger shapes run in test_cpu_large_shapes
CAUSAL = ["none", "top_left", "bottom_right"]
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def attention(q, k, v, causal):
    """The op under test, through the autograd wiring of the registered op."""
    out, lse = torch.ops.cuflash_attn.fwd(q, k, v, None, causal != "none", causal == "bottom_right")
    return out, lse


def check_against_reference(device, dtype, batch, heads, nq, nk, d, causal, seed=0, layout=None):
    """layout(n, device, dtype), if given, makes each [batch, heads, n, d] input (strided views)."""
    torch.manual_seed(seed)
    make = layout or (lambda n, device, dtype: torch.randn(batch, heads, n, d, dtype=torch.float64).to(device, dtype))
    q, k, v, dout = make(nq, device, dtype), make(nk, device, dtype), make(nk, device, dtype), make(nq, device, dtype)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    with poisoned_and_unmodified(q, k, v, dout):
        out, lse = attention(q, k, v, causal)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)

    is_causal, bottom_right = causal != "none", causal == "bottom_right"

    def grads_of(dt):
        qr, kr, vr = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        o, l = attention_reference(qr, kr, vr, is_causal, bottom_right=bottom_right, dtype=dt)
        return (o, l, *torch.autograd.grad(o, (qr, kr, vr), dout.to(dt)))

    ref = grads_of(torch.float64)
    pt = grads_of(dtype) if dtype in LOW_PRECISION else ref
    assert_close_to_reference("out", out, ref[0], pt[0], dtype, factor=2)
    assert_lse_close(lse, ref[1], dtype)
    for name, got, r, p in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[2:], pt[2:]):
        assert_close_to_reference(name, got, r, p, dtype, factor=3, zero_ref_scale=gradient_scale(ref[2:]))


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("d", CPU_HEAD_DIMS)
@pytest.mark.parametrize("nq,nk", [s for s in SHAPES if s[0] * s[1] <= CPU_MAX_PAIRS])
@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
def test_cpu(dtype, nq, nk, d, causal):
    check_against_reference("cpu", dtype, 1, 2, nq, nk, d, causal)


@pytest.mark.parametrize("nq,nk", [s for s in SHAPES if s[0] * s[1] > CPU_MAX_PAIRS])
def test_cpu_large_shapes(nq, nk):
    check_against_reference("cpu", torch.float32, 1, 1, nq, nk, 64, "top_left")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("d", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("nq,nk", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
def test_cuda(dtype, nq, nk, d, causal):
    check_against_reference("cuda", dtype, 2, 3, nq, nk, d, causal)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch,heads", [(1, 1), (1, 48), (160, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_grid_sizes(dtype, batch, heads):
    """batch 1 and batch larger than the SM count; heads 1 and many."""
    check_against_reference("cuda", dtype, batch, heads, 200, 333, 64, "top_left")


# CUFLASH_SWEEP_COUNT sets the cases per device; by default 200 on CPU (about 20 s on 2 cores)
# and 2000 on CUDA when a GPU is present.
# CUFLASH_SWEEP_SHARD=i/n keeps the seeds equal to i modulo n (parallel processes, one GPU).
_SWEEP_ENV = int(os.environ.get("CUFLASH_SWEEP_COUNT", "0"))
_SHARD, _SHARDS = map(int, os.environ.get("CUFLASH_SWEEP_SHARD", "0/1").split("/"))
SWEEP = [(d, s) for d, s in ([("cpu", s) for s in range(_SWEEP_ENV or 200)]
                             + [("cuda", s) for s in range((_SWEEP_ENV or 2000) if HAS_CUDA else 0)])
         if s % _SHARDS == _SHARD]


def draw_sweep_case(device, seed):
    """The case `seed` of the sweep, a function of (device, seed) only: (the name of the
    test_features check to run, its keyword arguments). Every case draws a dtype, a head dim, the
    heads (GQA and MQA ratios) and padded shapes or a packed batch of random lengths (zeros
    included); the features are drawn independently, each in a share of the cases."""
    g = torch.Generator().manual_seed(1000 + seed)
    uniform = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731  (hi included)
    chance = lambda p: torch.rand(1, generator=g).item() < p  # noqa: E731
    pick = lambda seq: seq[uniform(0, len(seq) - 1)]  # noqa: E731
    cuda = device == "cuda"
    # shared/TESTING.md's sweep: batch 1-8, seqlens 1-2000 (CUDA); CPU: CI's 2 cores.
    max_seqlen = 2000 if cuda else 300
    heads_kv = pick([1, 2])
    kwargs = dict(device=device, dtype=pick(list(DTYPE_IDS)), heads_q=heads_kv * pick([1, 2, 4] if cuda else [1, 3]),
                  heads_kv=heads_kv, d=uniform(1, 256), seed=seed)
    if chance(0.3):
        length = lambda: 0 if chance(0.2) else uniform(1, max_seqlen)  # noqa: E731
        batch = uniform(1, 8 if cuda else 4)
        check = "check_varlen"
        kwargs.update(lens_q=[length() for _ in range(batch)], lens_k=[length() for _ in range(batch)],
                      max_seqlen=chance(0.8))
    else:
        check = "check_dense"
        nq, nk = uniform(1, max_seqlen), uniform(1, max_seqlen)
        # Large batches with short rows, long rows with small batches: the float64 reference's
        # scores (batch x heads x nq x nk) stay under 2^25 elements, 256 MiB, as processes share the GPU.
        batch = min(uniform(1, 8 if cuda else 2), max(1, 2**25 // (kwargs["heads_q"] * nq * nk)))
        kwargs.update(batch=batch, nq=nq, nk=nk)
    # Options left at their defaults are left out, to keep the reproducer short. The alignment
    # applies to causal masks, windows and ALiBi alike.
    options = dict(causal=chance(0.4), bottom_right=chance(0.5),
                   window=(pick([-1, uniform(0, max_seqlen)]), pick([-1, uniform(0, max_seqlen)])) if chance(0.3)
                   else (-1, -1),
                   softcap=pick([0.5, 5.0, 30.0]) if chance(0.25) else 0.0,
                   alibi=pick(["heads", "batch"]) if chance(0.25) else None,
                   dropout_p=pick([0.1, 0.3]) if chance(0.15) else 0.0)
    if check == "check_dense" and chance(0.25):  # attn_mask: not with packed batches
        kwargs["attn_mask"] = (pick(["bool", "float"]), pick(list(test_features.MASK_SHAPES)))
    defaults = dict(causal=False, bottom_right=False, window=(-1, -1), softcap=0.0, alibi=None, dropout_p=0.0)
    kwargs.update({key: value for key, value in options.items() if value != defaults[key]})
    return check, kwargs


@pytest.mark.parametrize("device,seed", SWEEP, ids=[f"{d}-{s}" for d, s in SWEEP])
def test_random_sweep(device, seed):
    """A seeded sweep of shapes, head dims, dtypes, causal masks in both alignments, GQA/MQA,
    sliding windows, softcap, ALiBi, dropout and packed variable-length batches, against the
    float64 reference; a failure prints a one-line reproducer."""
    check, kwargs = draw_sweep_case(device, seed)
    try:
        getattr(test_features, check)(**kwargs)
    except Exception as e:
        call = f"{check}({', '.join(f'{key}={value!r}' for key, value in kwargs.items())})"
        raise AssertionError(
            f"random sweep case {device}-{seed} failed: {type(e).__name__}: {e}\nreproduce with\n"
            f"  CUFLASH_SWEEP_COUNT={seed + 1} python3 -m pytest -q 'tests/test_accuracy.py::test_random_sweep[{device}-{seed}]'\n"
            f"or\n  cd tests && PYTHONPATH=.. python3 -c \"import torch; from test_features import {check}; {call}\"") from e
