"""Split-KV (num_splits: each row's keys dealt into several CTAs whose partial outputs a combine
kernel merges; CUDA, 16-bit inputs): against float64 attention with the accuracy rule of every
path, for split counts that leave some splits empty or exceed the key blocks, with the masks,
features, GQA, seqused_k, a paged cache and packed queries; the automatic choice on a decoding
shape (the profiler shows the combine kernel ran); the argument's checks."""
import pytest
import torch

from conftest import DEVICES, HAS_CUDA, IS_SM90, cuda_kernels, sm90_parts_with
from cuflash_attn.flash_attn_interface import flash_attn_with_kvcache
from reference import LOW_PRECISION, LOW_PRECISION_IDS, assert_close_to_reference, assert_lse_close, attention_reference
from test_kvcache import per_sequence_reference

ops = torch.ops.cuflash_attn
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="split-KV is CUDA's")
COMBINE = "flash_fwd_combine_kernel"
# The kernels that run the splits: the sm_80-class one (the default), or under CUFLASH_SM90's
# "splits" part the plain TMA forward (softcap and the other features keep the sm_80-class one).
TMA_SPLIT_PARTS = sm90_parts_with("splits")
SPLIT_KERNEL = {"sm80": "flash_fwd_kernel<", "tma": "flash_fwd_sm90_tma_kernel<"}
# The TMA forward is built for head-dim buckets 64, 128 and 256 (sm90::kFwdHeadDim); of the head
# dims below, 96 and 200 (buckets 96 and 224) keep the sm_80-class split kernel under any switch.
TMA_SPLIT_HEAD_DIMS = {40, 64, 128, 256}


@pytest.fixture(params=["sm80", pytest.param("tma", marks=pytest.mark.skipif(not IS_SM90, reason="sm_90 only"))])
def split_kernel(request, monkeypatch):
    if request.param == "tma":
        monkeypatch.setenv("CUFLASH_SM90", TMA_SPLIT_PARTS)
    return request.param


@requires_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [40, 64, 96, 128, 200, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_splits", [2, 3, 7, 128])
def test_split_matches_reference(dtype, d, causal, num_splits, split_kernel):
    """GQA; 5 queries over 700 keys (a ragged last block), a window that leaves most splits of
    a row empty under the causal mask; the split kernel and the combine kernel ran. Head dims
    whose rows are not a power of two float4s (40, 96, 200) leave some of the combine kernel's
    threads without a column."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, 2, 700, d, device="cuda", dtype=dtype) for _ in range(2))
    window = (90, -1) if causal else (-1, -1)
    names = cuda_kernels(lambda: ops.fwd(q, k, v, None, causal, True, window[0], window[1], num_splits=num_splits))
    expected = split_kernel if d in TMA_SPLIT_HEAD_DIMS else "sm80"
    assert COMBINE in names and SPLIT_KERNEL[expected] in names, names
    out, lse = ops.fwd(q, k, v, None, causal, True, window[0], window[1], num_splits=num_splits)
    ref, ref_lse = attention_reference(q, k, v, causal, bottom_right=True, window=window)
    pt, _ = attention_reference(q, k, v, causal, bottom_right=True, window=window, dtype=dtype)
    assert_close_to_reference("out", out, ref, pt, dtype, factor=2)
    assert_lse_close(lse, ref_lse, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_split_with_features(dtype, split_kernel):
    """softcap, ALiBi, a boolean attn_mask and dropout (the same keep-mask as the unsplit kernel:
    the draw depends on (b, h, i, j) only) against the unsplit forward's result, and rows whose
    every key is masked (lse -inf, output 0)."""
    torch.manual_seed(1)
    q = torch.randn(2, 4, 3, 64, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, 4, 600, 64, device="cuda", dtype=dtype) for _ in range(2))
    mask = torch.rand(2, 1, 3, 600, device="cuda") > 0.3
    mask[1, :, 2] = False  # a row that sees no key
    slopes = torch.rand(4, device="cuda")
    rng = torch.tensor([7, 11], dtype=torch.int64, device="cuda")
    options = dict(softcap=20.0, alibi_slopes=slopes, attn_mask=mask, dropout_p=0.2, rng_state=rng)
    whole, whole_lse = ops.fwd(q, k, v, num_splits=1, **options)
    for splits in (2, 5):
        out, lse = ops.fwd(q, k, v, num_splits=splits, **options)
        tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
        assert (out.float() - whole.float()).abs().max().item() <= tol * whole.float().abs().max().item()
        torch.testing.assert_close(lse, whole_lse, atol=1e-4, rtol=1e-5)
        assert torch.isneginf(lse[1, :, 2]).all() and not out[1, :, 2].any()


@requires_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_split_with_seqused_k_paged_and_packed(dtype, split_kernel):
    """check_split_paged_and_packed; its paged step ran the split kernel and the combine kernel."""
    names = cuda_kernels(check_split_paged_and_packed(dtype))
    assert COMBINE in names and SPLIT_KERNEL[split_kernel] in names, names


def check_split_paged_and_packed(dtype):
    """seqused_k over a paged cache (two blocks of 256 a sequence) and packed queries (the
    sm_80-class kernel: TMA takes no cu_seqlens), split, against float64; returns the paged
    step (the kernel-name check needs the profiler, which compute-sanitizer displaces:
    sanitize_driver calls this alone)."""
    torch.manual_seed(2)
    k_pages, v_pages = (torch.randn(5, 2, 256, 64, device="cuda", dtype=dtype) for _ in range(2))
    table = torch.tensor([[3, 0], [1, 4]], dtype=torch.int32, device="cuda")
    used = torch.tensor([300, 17], dtype=torch.int32, device="cuda")
    q = torch.randn(2, 4, 2, 64, device="cuda", dtype=dtype)

    def paged_step():
        return ops.fwd(q, k_pages, v_pages, None, True, True, seqused_k=used, block_table=table, num_splits=4)

    out, lse = paged_step()
    k, v = (t[table.long()].permute(0, 2, 1, 3, 4).flatten(2, 3) for t in (k_pages, v_pages))
    ref = per_sequence_reference(q, k, v, used, True, torch.float64)
    pt = per_sequence_reference(q, k, v, used, True, dtype)
    assert_close_to_reference("out", out, ref[0], pt[0], dtype, factor=2)
    assert_lse_close(lse, ref[1], dtype)
    cu_q = torch.tensor([0, 1, 4], dtype=torch.int32, device="cuda")
    packed = torch.randn(4, 4, 64, device="cuda", dtype=dtype)
    got = ops.fwd(packed, k_pages, v_pages, None, True, True, cu_seqlens_q=cu_q, seqused_k=used, block_table=table,
                  num_splits=3)[0]
    for b, (q0, q1) in enumerate(((0, 1), (1, 4))):
        qb = packed[q0:q1].transpose(0, 1)[None]
        n = int(used[b])
        ref_b, _ = attention_reference(qb, k[b:b + 1, :, :n], v[b:b + 1, :, :n], True, bottom_right=True)
        pt_b, _ = attention_reference(qb, k[b:b + 1, :, :n], v[b:b + 1, :, :n], True, bottom_right=True, dtype=dtype)
        assert_close_to_reference(f"out[{b}]", got[q0:q1].transpose(0, 1)[None], ref_b, pt_b, dtype, factor=2)
    return paged_step


@requires_cuda
def test_decoding_splits_by_itself(split_kernel):
    """num_splits=0 on a decoding shape (one query token, few heads, a long cache) splits, and
    flash_attn_with_kvcache's default does the same; a prefill shape does not."""
    torch.manual_seed(3)
    q = torch.randn(1, 1, 4, 128, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(1, 8192, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    names = cuda_kernels(lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=5000))
    assert COMBINE in names and SPLIT_KERNEL[split_kernel] in names, names
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=5000)
    ref, _ = attention_reference(*(t.transpose(1, 2) for t in (q, k_cache[:, :5000], v_cache[:, :5000])))
    pt, _ = attention_reference(*(t.transpose(1, 2) for t in (q, k_cache[:, :5000], v_cache[:, :5000])),
                                dtype=torch.bfloat16)
    assert_close_to_reference("out", out.transpose(1, 2), ref, pt, torch.bfloat16, factor=2)
    assert COMBINE not in cuda_kernels(lambda: flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=1))
    long_q = torch.randn(1, 4, 1024, 128, device="cuda", dtype=torch.bfloat16)
    kt, vt = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    assert COMBINE not in cuda_kernels(lambda: ops.fwd(long_q, kt, vt, num_splits=0))


@pytest.mark.parametrize("device", DEVICES)
def test_num_splits_checked(device):
    """Negative num_splits is refused (flash_attn's interface: taken as 0, as flash_attn takes
    it); elsewhere than 16-bit CUDA it changes nothing (float64 here gives the bitwise same result)."""
    q, k, v = (torch.randn(1, 2, 4, 32, device=device, dtype=torch.float64) for _ in range(3))
    with pytest.raises(ValueError, match="num_splits must be >= 0"):
        ops.fwd(q, k, v, num_splits=-1)
    assert torch.equal(ops.fwd(q, k, v, num_splits=4)[0], ops.fwd(q, k, v)[0])
    import cuflash_attn
    with pytest.raises(TypeError, match="num_splits must be an int"):
        cuflash_attn.flash_attention(q, k, v, num_splits=2.0)
    with pytest.raises(ValueError, match="num_splits must be >= 0"):
        cuflash_attn.flash_attention(q, k, v, num_splits=-2)
    cache = torch.randn(1, 8, 2, 32, device=device, dtype=torch.float64)
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="num_splits must be an int"):
            flash_attn_with_kvcache(q.transpose(1, 2), cache, cache, num_splits=bad)
    # flash_attn's heuristic takes every value below 1: so does its interface here.
    chosen = flash_attn_with_kvcache(q.transpose(1, 2), cache, cache, num_splits=0)
    assert torch.equal(flash_attn_with_kvcache(q.transpose(1, 2), cache, cache, num_splits=-1), chosen)


@requires_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_split_backward_unchanged(dtype):
    """num_splits is the forward's: the autograd backward through a split forward gives the
    unsplit forward's gradients (the lse they recompute from agrees)."""
    torch.manual_seed(4)
    q = torch.randn(1, 2, 8, 64, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, 2, 500, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    dout = torch.randn(1, 2, 8, 64, device="cuda", dtype=dtype)
    grads = [torch.autograd.grad(ops.fwd(q, k, v, num_splits=s)[0], (q, k, v), dout) for s in (1, 4)]
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        scale = a.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 2e-2 * scale, name
