import contextlib

import pytest
import torch

import cuflash_attn  # noqa: F401  (registers torch.ops.cuflash_attn for every test module)
from cuflash_attn import flash_attn_interface as fa

HAS_CUDA = torch.cuda.is_available()
# The Hopper kernels (csrc/cuda/sm90) run on compute capability 9.0 only.
IS_SM90 = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"))]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# CUFLASH_SM90's default parts (csrc/cuda/run_switches.h), for lists that add or leave out one.
SM90_DEFAULT_PARTS = "tma,bwd,bwdws,features,persistent,kvcache,varlen,bwdvarlen,bwdfeatures,masktma,bwdmasktma,persistentfeatures,persistentwindow"


def sm90_parts_without(*names):
    """CUFLASH_SM90's default parts less those named."""
    return ",".join(part for part in SM90_DEFAULT_PARTS.split(",") if part not in names)


def sm90_parts_with(*names):
    """CUFLASH_SM90's default parts and those named (parts that are not defaults)."""
    return ",".join([SM90_DEFAULT_PARTS, *names])


def packed_offsets(lengths, device="cuda"):
    """cu_seqlens (int32 [len(lengths) + 1]) of packed sequences of these lengths."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 results are checked without TF32 unless a test allows it."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def set_threads():
    """torch.set_num_threads for the test (more than the cores is allowed), torch's count restored
    after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


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


def dkdv_tma_kernel(d, accum_dq=False, dk=True, dv=True, wide=False, ordered=False, packed=False, features=False,
                    staged_mask=False):
    """The profiler's name of the warp-specialized Hopper dK/dV kernel (flash_bwd_sm90_tma.cuh) for
    bf16 at head-dim bucket d, its template flags in order: dQ accumulated in it (the fused
    kernel), dK, dV, 128-query steps, ordered dQ adds, packed sequences, the features, a staged
    attn_mask."""
    flags = ", ".join(str(flag).lower() for flag in (accum_dq, dk, dv, wide, ordered, packed, features, staged_mask))
    return f"flash_bwd_dkdv_sm90_tma_kernel<__nv_bfloat16, {d}, {flags}>"


def fused_backward_kernel(d, wide=False, ordered=False, packed=False, features=False, staged_mask=False):
    """The profiler's name of the fused warp-specialized Hopper backward (dK, dV and dQ in one
    kernel) for bf16 at head-dim bucket d: 128-query steps (wide, head dim 64), ordered dQ adds,
    packed sequences (CUFLASH_SM90's "bwdvarlen" part), softcap, ALiBi,
    attn_mask and dropout (its "bwdfeatures" part), an attn_mask's tiles staged by TMA (its
    "bwdmasktma" part). Head dim 256 has its own kernel (flash_bwd_sm90_fused256.cuh)."""
    if d == 256:
        flags = ", ".join(str(flag).lower() for flag in (ordered, packed, features))
        return f"flash_bwd_fused_sm90_tma_kernel<__nv_bfloat16, {flags}>"
    return dkdv_tma_kernel(d, accum_dq=True, wide=wide, ordered=ordered, packed=packed, features=features,
                           staged_mask=staged_mask)


# The public entry points that entry_call runs (tests/test_ops.py: determinism and the race test;
# tests/test_streams.py: concurrent streams).
ENTRIES = ["ops.fwd", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "sdpa"]


def entry_call(name, device, batch):
    """A call of a public entry point over `batch` sequences: a function of no arguments returning
    its outputs (out, lse where the entry returns it, and the gradients where it has a backward,
    deterministic=True), each call recomputing all of them. float16 on CUDA, float32 on the CPU."""
    g = torch.Generator().manual_seed(3)
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    if name == "ops.fwd":  # dq too: on Hopper the fused backward adds it up, in a fixed order
        q, k, v = (rand(batch, 4, 256, 64).requires_grad_() for _ in range(3))
        dout = rand(batch, 4, 256, 64)

        def run():
            out, lse = torch.ops.cuflash_attn.fwd(q, k, v, None, False, False)
            return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))
    elif name == "flash_attn_func":  # [B, N, H, D], GQA, bottom-right causal with a window
        q, k, v = (rand(batch, 256, h, 64).requires_grad_() for h in (8, 2, 2))
        dout = rand(batch, 256, 8, 64)

        def run():
            out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, window_size=(100, 0), deterministic=True,
                                             return_attn_probs=True)
            return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))
    elif name == "flash_attn_varlen_func":  # sequences of 0-300 keys packed
        lengths = torch.randint(0, 300, (batch,), generator=g)
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device, torch.int32)
        q, k, v = (rand(int(lengths.sum()), 4, 128).requires_grad_() for _ in range(3))
        dout = rand(*q.shape)

        def run():
            out = fa.flash_attn_varlen_func(q, k, v, cu, cu, 300, 300, causal=True, deterministic=True)
            return (out, *torch.autograd.grad(out, (q, k, v), dout))
    elif name == "flash_attn_with_kvcache":  # decoding steps of 4 tokens over paged keys, split 5 ways
        q = rand(batch, 4, 8, 128)
        k_cache, v_cache = rand(batch * 8, 256, 2, 128), rand(batch * 8, 256, 2, 128)
        block_table = torch.randperm(batch * 8, generator=g).reshape(batch, 8).to(device, torch.int32)
        seqlens = torch.randint(1, 8 * 256, (batch,), generator=g).to(device, torch.int32)

        def run():
            return fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=block_table,
                                              causal=True, num_splits=5, return_softmax_lse=True)
    else:  # the SDPA drop-in, GQA
        q, k, v = (rand(batch, h, 256, 64).requires_grad_() for h in (8, 2, 2))
        dout = rand(batch, 8, 256, 64)

        def run():
            out = sdpa_on_kernels(q, k, v, is_causal=True)
            return (out, *torch.autograd.grad(out, (q, k, v), dout))
    return run
