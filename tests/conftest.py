import contextlib

import pytest
import torch

import cuflash_attn  # noqa: F401  (registers torch.ops.cuflash_attn for every test module)

HAS_CUDA = torch.cuda.is_available()
# The Hopper kernels (csrc/cuda/sm90) run on compute capability 9.0 only.
IS_SM90 = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"))]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 results are checked without TF32 unless a test allows it."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def skip_outside_head_dim_bucket(request, bucket, why):
    """For a fixture's mode that only changes the kernels of one head-dim bucket (64: (32, 64],
    128: (96, 128]): skip the test when its "d" parameter (if any) lies outside it."""
    d = getattr(request.node, "callspec", None) and request.node.callspec.params.get("d")
    if d is not None and not {64: 32, 128: 96}[bucket] < d <= bucket:
        pytest.skip(why)


def poison_cuda_allocator(nbytes):
    """Fill a cached block with NaN and free it, so that an op allocating its outputs next
    likely receives NaN-filled memory: an element the kernel fails to write then fails."""
    if HAS_CUDA and nbytes > 0:
        block = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda")
        del block



@contextlib.contextmanager
def poisoned_and_unmodified(*inputs):
    """Around a kernel run: poisons the CUDA allocator first (outputs allocated in the body likely
    start as NaN, so an element the kernels forget to write fails), and checks afterwards that
    the body left `inputs` unchanged."""
    originals = [t.detach().clone() for t in inputs]
    poison_cuda_allocator(8 * sum(t.numel() * t.element_size() for t in inputs))
    yield
    for before, after in zip(originals, inputs):
        assert torch.equal(before, after.detach()), "an input was modified"


def assert_cuda_graph_replays_bitwise(step):
    """Captures step() (returning tensors) in a CUDA graph, after warming it up on a side stream as
    torch's CUDA graph docs prescribe; every replay must equal an eager run bitwise."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    eager = step()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(eager, captured):
            assert torch.equal(a, b)


def cuda_kernels(fn):
    """The names of the CUDA kernels (and runtime calls) that fn() launches, space-separated."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.name for e in prof.events())


def sdpa_on_kernels(q, k, v, **kwargs):
    """torch.nn.functional.scaled_dot_product_attention after cuflash_attn.enable(), checked to have
    run cuflash_attn's kernels (one more call counted, no fallback to torch's SDPA); GQA where k
    has fewer heads than q."""
    before = cuflash_attn.sdpa_stats()
    with cuflash_attn.enable():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[-3] != k.shape[-3],
                                                               **kwargs)
    after = cuflash_attn.sdpa_stats()
    assert after["cuflash_attn"] == before["cuflash_attn"] + 1 and after["fallback"] == before["fallback"], \
        f"torch's SDPA ran, not the kernels: {before} -> {after}"
    return out


def fused_backward_kernel(d, wide=False, ordered=False):
    """The profiler's name of the fused warp-specialized Hopper backward (dK, dV and dQ in one
    kernel) for bf16 at head-dim bucket d: 128-query steps (wide), ordered dQ adds."""
    flags = ", ".join(str(flag).lower() for flag in (True, True, True, wide, ordered))
    return f"flash_bwd_dkdv_sm90_tma_kernel<__nv_bfloat16, {d}, {flags}>"
