"""The Hopper forwards, which plain 16-bit attention at head-dim buckets 64, 128 and 256 takes on a
compute capability 9.0 GPU of an sm_90a build: the warp-specialized flash_fwd_sm90_tma.cuh (TMA
producer, two consumer warpgroups; the default) and csrc/cuda/sm90/flash_fwd_sm90.cuh (wgmma from
swizzled shared memory, cp.async loads; CUFLASH_SM90=cpasync, and what inputs TMA cannot
address take), the TMA one as a persistent kernel (CUFLASH_SM90=tma,persistent; by
default on short rows at head dims up to 128), and the TMA one on its wide tile at every length
(CUFLASH_FWD_TILE=wide; by default on long rows). Every test runs under each of the four (the
`mode` fixture). The same accuracy rule as every path, over the shapes that stress the tiles (one
query, ragged blocks, rows that see no key), the masks, GQA, varlen and the [B, N, H, D] layout;
the profiler shows which kernel ran, and CUFLASH_SM90=0 switches back to the sm_80-class kernel.
The "features" part (a default) adds softcap, ALiBi, attn_mask and dropout to the cp.async and
TMA kernels."""
import math

import pytest
import torch

from conftest import IS_SM90, cuda_kernels, packed_offsets
from reference import (LOW_PRECISION, LOW_PRECISION_IDS, assert_close_to_reference, assert_lse_close,
                       attention_reference)
from test_features import check_dense, check_varlen
from test_kvcache import per_sequence_reference
from test_paged_kv import PAGE, gathered, paged_case

pytestmark = pytest.mark.skipif(not IS_SM90, reason="needs a compute capability 9.0 GPU")
KERNEL = {"cpasync": "flash_fwd_sm90_kernel", "tma": "flash_fwd_sm90_tma_kernel",
          "persistent": "flash_fwd_sm90_tma_kernel", "wide": "flash_fwd_sm90_tma_kernel"}
KERNEL_DTYPE = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half"}  # as the profiler names T
SWITCH = {"cpasync": "cpasync", "tma": "tma", "persistent": "tma,persistent", "wide": "tma"}  # CUFLASH_SM90


@pytest.fixture(params=["cpasync", "tma", "persistent", "wide"], autouse=True)
def mode(request, monkeypatch):
    monkeypatch.setenv("CUFLASH_SM90", SWITCH[request.param])  # read by the op at every call
    if request.param == "wide":
        monkeypatch.setenv("CUFLASH_FWD_TILE", "wide")
    return request.param


def tma_kernel(d, wide=False, features=False, persistent=False, staged_mask=False, dtype=torch.bfloat16):
    """The TMA kernel's name as the profiler shows it (staged_mask: the kernel that stages an
    attn_mask's tiles, the "masktma" part's)."""
    flags = ", ".join(str(f).lower() for f in (wide, features, persistent and d <= 128, staged_mask))
    return f"flash_fwd_sm90_tma_kernel<{KERNEL_DTYPE[dtype]}, {d}, {flags}>"


def bucket(d):
    return 64 if d <= 64 else 128 if d <= 128 else 256


def persistent_wide(d, masked, nq=1000):
    """Whether the persistent kernel runs on its wide tile: head-dim bucket 64 without a mask, more
    than 128 query rows."""
    return bucket(d) == 64 and not masked and nq > 128


def persistent_rows(d, nq, keys, causal):
    """Whether the persistent kernel takes a dense call (head-dim buckets 64 and 128): rows of fewer
    than 2048 keys; without a mask longer ones too, on the wide tile at head dim 64 (past 128 query
    rows), below the wide tile's 4096 keys at 128."""
    if keys < 2048:
        return bucket(d) <= 128
    if causal:
        return False
    return persistent_wide(d, False, nq) if bucket(d) == 64 else bucket(d) == 128 and keys < 4096


def packed_kernel(d, longest, masked, part, dtype=torch.bfloat16):
    """The TMA kernel packed sequences whose rows see fewer than 2048 keys take in varlen_part's
    run `part`: the tile a dense batch of the longest sequence's length would take (persistent
    where that part is on, and then at head dim 64 wide as persistent_wide says); under
    CUFLASH_FWD_TILE=wide the wide tile at head dim 64, the narrow one at 128 and 256 (their wide
    tiles take no packed sequences)."""
    if part == "wide":
        return tma_kernel(bucket(d), wide=bucket(d) == 64, dtype=dtype)
    persistent = part == "persistent"
    return tma_kernel(bucket(d), wide=persistent and persistent_wide(d, masked, nq=longest), dtype=dtype,
                      persistent=persistent)


def forward_kernels(d, dtype=torch.bfloat16, **kw):
    q, k, v = (torch.randn(1, 2, 100, d, device="cuda", dtype=dtype) for _ in range(3))
    return cuda_kernels(lambda: torch.ops.cuflash_attn.fwd(q, k, v, None, False, False, **kw))


@pytest.mark.parametrize("d", [40, 64, 100, 128, 240, 256])
def test_path_taken(d, mode, monkeypatch):
    names = forward_kernels(d)
    if KERNEL[mode] + "<" not in names:
        pytest.fail(f"the {mode} Hopper forward did not run (an sm_90a build?): {names}")
    if mode == "persistent":  # its own instantiation up to 128; the one-tile-per-CTA kernel past
        assert tma_kernel(bucket(d), wide=persistent_wide(d, False, nq=100), persistent=True) in names, names
    if mode == "wide":
        assert tma_kernel(bucket(d), wide=True) in names, names
    monkeypatch.setenv("CUFLASH_SM90", "0")
    names = forward_kernels(d)
    assert "flash_fwd_sm90" not in names and "flash_fwd_kernel" in names, names


def check_kv_cache_on_tma(mode, q, k, v, poisoned_k, poisoned_v, causal, used, gathered_kv=None, **options):
    """ops.fwd over a KV cache (seqused_k = used; options: a block table) bitwise equal with the
    rows it does not use poisoned, against float64 per sequence over gathered_kv (default: k, v);
    the mode's kernel ran."""
    def run(kk, vv):
        return torch.ops.cuflash_attn.fwd(q, kk, vv, None, causal, True, seqused_k=used, **options)

    results = [run(k, v), run(poisoned_k, poisoned_v)]
    for name, clean, poisoned in zip(("out", "lse"), *results):
        assert torch.equal(clean, poisoned), name
    ref_k, ref_v = gathered_kv or (k, v)
    ref = per_sequence_reference(q, ref_k, ref_v, used, causal, torch.float64)
    pt = per_sequence_reference(q, ref_k, ref_v, used, causal, torch.bfloat16)
    assert_close_to_reference("out", results[0][0], ref[0], pt[0], torch.bfloat16, factor=2)
    assert_lse_close(results[0][1], ref[1], torch.bfloat16)
    names = cuda_kernels(lambda: run(k, v))
    assert (KERNEL[mode] + "<") in names, names
    return run


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq", [1, 20, 300])
def test_seqused_k_on_tma_ignores_stale_rows(d, causal, nq, mode, monkeypatch):
    """Under the "kvcache" part (a default) the TMA forwards (their narrow tiles) take seqused_k
    (a KV cache's keys in use): a sequence's last key block runs past its keys into rows TMA reads
    with it, which hold NaN and Inf here and change nothing (bitwise the finite case's); against
    float64 per sequence, for lengths of no key, part of a block of 64 or 128 keys, and all of
    them (the block past the tensor's rows: TMA's zeros). Without the part the cp.async kernel
    runs; with no CUFLASH_SM90 the TMA one. 16 query heads: at 300 queries more tiles than SMs,
    so persistent CTAs walk several (each tile's V rows zeroed after the previous tile's end)."""
    monkeypatch.setenv("CUFLASH_SM90", SWITCH[mode] + ",kvcache")
    torch.manual_seed(d + nq)
    q = torch.randn(4, 16, nq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(4, 2, 700, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    used = torch.tensor([77, 0, 640, 700], dtype=torch.int32, device="cuda")
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for b, n in enumerate(used.tolist()):
        poisoned_k[b, :, n:] = float("nan")
        poisoned_v[b, :, n:] = float("inf")
    run = check_kv_cache_on_tma(mode, q, k, v, poisoned_k, poisoned_v, causal, used)
    monkeypatch.setenv("CUFLASH_SM90", SWITCH[mode])  # without the part: the cp.async kernel
    if mode != "cpasync":
        names = cuda_kernels(lambda: run(k, v))
        assert "flash_fwd_sm90_tma_kernel" not in names and "flash_fwd_sm90_kernel<" in names, names
    monkeypatch.delenv("CUFLASH_SM90")
    assert "flash_fwd_sm90_tma_kernel<" in cuda_kernels(lambda: run(k, v))


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_paged_cache_on_tma(d, causal, mode, monkeypatch):
    """Under the "kvcache" part (a default) the TMA forwards read a paged cache page by page (the block
    table's pages in a shuffled order, clamped ids never read), every row a sequence does not use
    NaN or Inf; bitwise the finite case's, against float64 over the gathered keys."""
    monkeypatch.setenv("CUFLASH_SM90", SWITCH[mode] + ",kvcache")
    k_pages, v_pages, table = paged_case("cuda", torch.bfloat16, d)
    q = torch.randn(4, 4, 37, d, device="cuda", dtype=torch.bfloat16)
    used = torch.tensor([0, 30, PAGE + 5, 2 * PAGE], dtype=torch.int32, device="cuda")
    keep = torch.zeros(k_pages.shape[0], PAGE, dtype=torch.bool, device="cuda")  # the rows in use
    for b, n in enumerate(used.tolist()):
        for j in range(0, n, PAGE):
            keep[table[b, j // PAGE], :min(PAGE, n - j)] = True
    poisoned_k = torch.where(keep[:, None, :, None], k_pages, float("nan"))
    poisoned_v = torch.where(keep[:, None, :, None], v_pages, float("inf"))
    check_kv_cache_on_tma(mode, q, k_pages, v_pages, poisoned_k, poisoned_v, causal, used,
                          gathered_kv=(gathered(k_pages, table, 2), gathered(v_pages, table, 2)), block_table=table)


def test_other_cases_keep_the_sm80_kernel():
    assert "flash_fwd_sm90" not in forward_kernels(32)  # bucket 32
    assert "flash_fwd_sm90" not in forward_kernels(96)  # bucket 96
    assert "flash_fwd_sm90" not in forward_kernels(64, softcap=30.0)  # feature path


def test_default_parts(monkeypatch):
    """Unset: the TMA forward (persistent on short rows, with the features too) and the
    warp-specialized Hopper backward."""
    monkeypatch.delenv("CUFLASH_SM90")
    monkeypatch.delenv("CUFLASH_FWD_TILE", raising=False)
    q, k, v = (torch.randn(1, 2, 100, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    names = cuda_kernels(lambda: torch.autograd.grad(torch.ops.cuflash_attn.fwd(q, k, v, None, False, False)[0].sum(),
                                                     (q, k, v)))
    assert tma_kernel(128, persistent=True) in names, names
    backward = ("flash_bwd_dq_sm90_tma_kernel", "flash_bwd_dkdv_sm90_tma_kernel")
    assert all(f"{kernel}<" in names for kernel in backward), names
    assert tma_kernel(128, features=True, persistent=True) in forward_kernels(128, softcap=30.0)


def test_fallback_is_visible_in_debug_mode(monkeypatch, capfd):
    """Softcap without the "features" part runs the sm_80-class forward, and
    CUFLASH_DEBUG=1 says so."""
    monkeypatch.setenv("CUFLASH_DEBUG", "1")
    forward_kernels(64, softcap=30.0)
    err = capfd.readouterr().err
    assert "cuflash::flash_fwd_kernel<__nv_bfloat16, 64, true, " in err and "sm90" not in err, err


def with_features(mode, monkeypatch):
    monkeypatch.setenv("CUFLASH_SM90", "features" if mode == "cpasync" else SWITCH[mode] + ",features")


@pytest.mark.parametrize("d", [64, 128, 256])
def test_feature_path_taken(d, mode, monkeypatch):
    """The mode's kernel with kFeatures: the TMA one on its narrow tile, but at head dim 64 on the
    wide one past 128 query rows of 1024 keys or more without dropout, and at head dims 64 and
    128 at every length where CUFLASH_FWD_TILE=wide asks."""
    with_features(mode, monkeypatch)

    def expected(wide_by_default):
        if mode == "cpasync":
            return f"flash_fwd_sm90_kernel<__nv_bfloat16, {d}, true>"
        wide = (d == 64 and wide_by_default) or (d <= 128 and mode == "wide")
        return tma_kernel(d, wide=wide, features=True)

    names = forward_kernels(d, softcap=30.0)
    assert expected(False) in names, names
    q = torch.randn(1, 1, 300, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1, 4096, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    names = cuda_kernels(lambda: torch.ops.cuflash_attn.fwd(q, k, v, None, False, False, softcap=30.0))
    assert expected(True) in names, names
    names = cuda_kernels(lambda: torch.ops.cuflash_attn.fwd(q[:, :, :100].contiguous(), k, v, None, False, False,
                                                            softcap=30.0))
    assert expected(False) in names, names
    rng_state = torch.tensor([1, 0], device="cuda")
    names = cuda_kernels(lambda: torch.ops.cuflash_attn.fwd(q, k, v, None, False, False, dropout_p=0.1,
                                                            rng_state=rng_state))
    assert expected(False) in names, names


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_features(dtype, d, mode, monkeypatch):
    """GQA, a window, softcap, ALiBi and dropout together; float and bool attn_masks."""
    with_features(mode, monkeypatch)
    check_dense("cuda", dtype, 2, 8, 2, 150, 300, d, causal=True, bottom_right=True, window=(60, -1),
                softcap=20.0, alibi="batch", dropout_p=0.2)
    check_dense("cuda", dtype, 2, 4, 2, 130, 77, d, attn_mask=("float", "B1LS"))
    check_dense("cuda", dtype, 1, 2, 2, 200, 333, d, attn_mask=("bool", "B1LS"))
    check_dense("cuda", dtype, 1, 2, 1, 200, 2100, d, softcap=15.0, alibi="batch", dropout_p=0.1)  # long rows
    check_dense("cuda", dtype, 1, 2, 1, 200, 2100, d, softcap=15.0, alibi="batch")  # 64: the wide tile
    # Softcap alone and dropout alone: the exponent takes the last factor (cap_out, the scale),
    # also under a negative scale (softcap's factor is still positive; dropout's is not, and
    # those scores are made whole first).
    check_dense("cuda", dtype, 1, 2, 1, 200, 333, d, softcap=15.0)
    check_dense("cuda", dtype, 1, 2, 1, 200, 333, d, dropout_p=0.2)
    check_dense("cuda", dtype, 1, 2, 1, 200, 333, d, softcap=15.0, dropout_p=0.2, scale=-0.1)
    check_dense("cuda", dtype, 1, 2, 1, 200, 333, d, dropout_p=0.2, scale=-0.1)


def packed_forward_kernels(lens, d, causal=False):
    """The kernels a forward over packed bf16 sequences of these lengths (2 heads) launches."""
    q, k, v = (torch.randn(sum(lens), 2, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = packed_offsets(lens)
    longest = max(lens)
    return cuda_kernels(lambda: torch.ops.cuflash_attn.fwd(q, k, v, None, causal, False, cu_seqlens_q=cu,
                                                           cu_seqlens_k=cu, max_seqlen_q=longest,
                                                           max_seqlen_k=longest))


def test_varlen_never_takes_tma():
    """With "varlen" left out of CUFLASH_SM90's list packed sequences run the cp.async kernel."""
    names = packed_forward_kernels([100, 200], 64)
    assert "flash_fwd_sm90_kernel<" in names and "tma" not in names, names


@pytest.fixture(params=["narrow", "persistent", "wide"])
def varlen_part(request, mode, monkeypatch):
    """The "varlen" part named (at every shape) for the test, in one of the modes' runs only: with
    or without the persistent kernel (which takes packed sequences where it would take a dense
    batch of the longest one's length: these tests' short ones, at head dims up to 128), or with
    the wide tile asked for (CUFLASH_FWD_TILE=wide: at head dim 64 the wide kernel that is not
    persistent, which the defaults give masked sequences from 2048 keys). Returns the run's name,
    packed_kernel's `part`."""
    if mode != "tma":
        pytest.skip("one run: the part is set here")
    monkeypatch.setenv("CUFLASH_SM90", "tma,persistent,varlen" if request.param == "persistent" else "tma,varlen")
    if request.param == "wide":
        monkeypatch.setenv("CUFLASH_FWD_TILE", "wide")
    return request.param


VARLEN_TMA_LENGTHS = [([5, 0, 130, 64], [7, 3, 130, 0]), ([1], [1]), ([200, 33, 0], [100, 333, 0]),
                      ([300, 129, 700], [300, 129, 700]), ([64, 1000], [1000, 64])]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("lens", VARLEN_TMA_LENGTHS, ids=[f"lens{i}" for i in range(len(VARLEN_TMA_LENGTHS))])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_on_tma(dtype, d, lens, causal, varlen_part):
    """Packed sequences on the TMA forward (the "varlen" part): empty ones, one token, keys ending
    inside a key block (the next sequence's rows read and their V zeroed), query blocks past a
    short sequence's end (an empty tile), GQA and bottom-right causal; without a mask at head dim
    64 the persistent kernel's wide tile (192 query rows a tile)."""
    lens_q, lens_k = lens
    names = cuda_kernels(lambda: check_varlen("cuda", dtype, lens_q, lens_k, 4, 2, d, causal=causal,
                                              bottom_right=True))
    assert packed_kernel(d, max(lens_q), causal, varlen_part, dtype=dtype) in names, names


@pytest.mark.parametrize("d", [40, 64, 100, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_on_tma_many_tiles(d, causal, varlen_part):
    """More tiles than the GPU has SMs (8 query blocks x 16 heads x 8 sequences): the persistent
    CTAs walk several packed tiles each, real and empty ones in turn (the staging tile, Q's
    buffer and the K/V ring reused across them); head dims below the tile's (40 on 64, 100 on
    128: the stores' columns)."""
    lens = [700, 513, 64, 0, 300, 1000, 129, 640]
    names = cuda_kernels(lambda: check_varlen("cuda", torch.bfloat16, lens, lens, 16, 4, d, causal=causal,
                                              bottom_right=True))
    assert packed_kernel(d, max(lens), causal, varlen_part) in names, names


@pytest.mark.parametrize("d", [64, 128])
def test_varlen_on_tma_windows_and_unknown_lengths(d, varlen_part):
    """Packed sequences on the TMA forward with a sliding window (key blocks from inside the
    sequence); with max_seqlen not given (the grid from the packed length: most query blocks
    empty) on the cp.async one (sm90_paths declines such a grid)."""
    lens_q, lens_k = [300, 0, 129, 700], [300, 40, 129, 500]
    names = cuda_kernels(lambda: check_varlen("cuda", torch.bfloat16, lens_q, lens_k, 4, 2, d, window=(100, 20),
                                              bottom_right=True))
    assert packed_kernel(d, max(lens_q), True, varlen_part) in names, names
    names = cuda_kernels(lambda: check_varlen("cuda", torch.bfloat16, lens_q, lens_k, 4, 2, d, max_seqlen=False,
                                              causal=True))
    assert "flash_fwd_sm90_kernel<" in names and "flash_fwd_sm90_tma_kernel" not in names, names


@pytest.mark.parametrize("d,longest,causal,wide,persistent",
                         [(40, 1000, True, False, True), (64, 3000, True, False, True), (100, 300, True, False, True),
                          (128, 6000, True, False, False), (256, 300, True, False, False),
                          (64, 3000, False, True, True), (64, 5000, True, True, False), (128, 3000, False, False, True),
                          (128, 5000, False, False, False)])
def test_varlen_default_choice(d, longest, causal, wide, persistent, mode, monkeypatch):
    """Under the defaults packed sequences take the TMA forward on the tile a dense batch of the
    longest sequence would take: persistent up to head dim 128 where its middle row sees fewer
    than 2048 keys, or without a mask at head dims 64 (the wide tile) and 128 (up to 4096 keys);
    at head dim 64 the wide tile from 2048 keys (the grid's, under a causal mask); the wide tiles
    of head dims 128 and 256 never (they take no packed sequences: at 128 past 4096 keys without a
    mask the narrow tile, not persistent)."""
    if mode != "tma":
        pytest.skip("one run: the defaults are set here")
    monkeypatch.delenv("CUFLASH_SM90")
    names = packed_forward_kernels([longest, 100], d, causal=causal)
    assert tma_kernel(bucket(d), wide=wide, persistent=persistent) in names, names


def test_varlen_on_tma_keeps_sequences_apart(varlen_part):
    """Each sequence's last key and query blocks read the next one's rows: NaN in the middle
    sequence's q, k and v must not reach the first or the last one's output (each matching its
    own reference), and the rows after the last sequence, which the op zero-fills, must stay 0
    (lse -inf): no store past a sequence's end."""
    torch.manual_seed(0)
    total = 330  # sequences of 100, 150 and 50 rows, then 30 that none covers
    q, k, v = (torch.randn(total, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for t in (q, k, v):
        t[100:250] = float("nan")
    cu = torch.tensor([0, 100, 250, 300], device="cuda", dtype=torch.int32)
    call = lambda: torch.ops.cuflash_attn.fwd(q, k, v, None, False, False, cu_seqlens_q=cu,  # noqa: E731
                                              cu_seqlens_k=cu, max_seqlen_q=150, max_seqlen_k=150)
    assert packed_kernel(64, 150, False, varlen_part) in cuda_kernels(call)  # wide where persistent or asked
    out, lse = call()
    for rows in (slice(0, 100), slice(250, 300)):
        seq = [t[rows].transpose(0, 1)[None] for t in (q, k, v)]
        ref_out, ref_lse = attention_reference(*seq)
        pt_out, _ = attention_reference(*seq, dtype=torch.bfloat16)
        assert_close_to_reference("out", out[rows].transpose(0, 1)[None], ref_out, pt_out, torch.bfloat16, factor=2,
                                  lse=ref_lse)
        assert_lse_close(lse[:, rows][None], ref_lse, torch.bfloat16)
    assert torch.isnan(out[100:250]).all()
    assert torch.all(out[300:] == 0) and torch.all(torch.isneginf(lse[:, 300:]))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [40, 64, 100, 128, 240, 256])
@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 1000), (77, 200), (200, 77), (128, 128), (257, 513), (1000, 1000)])
@pytest.mark.parametrize("causal,bottom_right", [(False, False), (True, False), (True, True)],
                         ids=["none", "top_left", "bottom_right"])
def test_matches_reference(dtype, d, nq, nk, causal, bottom_right):
    check_dense("cuda", dtype, 2, 2, 2, nq, nk, d, causal=causal, bottom_right=bottom_right)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("nq,nk,causal,keys", [(100, 100, False, 100), (300, 300, False, 300),
                                               (100, 2048, False, 2048), (2048, 2048, True, 1024),
                                               (4096, 4096, True, 2048), (100, 4096, False, 4096)])
def test_tma_tile_choice(d, nq, nk, causal, keys, mode, monkeypatch):
    """The TMA kernel takes its wide tile where the middle query row sees 2048 keys or more (4096
    at head dim 128), the persistent kernel (head dims up to 128) where it sees fewer than 2048
    and without a mask beyond (persistent_rows), on the wide tile at head dim 64 without a mask
    past 128 query rows; CUFLASH_FWD_TILE names the tile at every length."""
    wide = keys >= (4096 if d == 128 else 2048)
    if mode == "cpasync":
        pytest.skip("the TMA kernel's tiles")
    if mode == "wide":
        wide = True
    elif mode == "tma" and wide:  # "narrow" overrides the long rows' choice
        monkeypatch.setenv("CUFLASH_FWD_TILE", "narrow")
        wide = False
    q = torch.randn(1, 1, nq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1, nk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    names = cuda_kernels(lambda: torch.ops.cuflash_attn.fwd(q, k, v, None, causal, False))
    persistent = mode == "persistent" and persistent_rows(d, nq, keys, causal)
    wide = wide or (persistent and persistent_wide(d, causal, nq))
    assert tma_kernel(d, wide=wide, persistent=persistent) in names, names


@pytest.mark.parametrize("causal", [False, True])
def test_narrow_tile_walks_long_rows_at_128(causal, mode, monkeypatch):
    """CUFLASH_FWD_TILE=narrow at head dim 128 on rows of 4096 keys (the wide tile's by default):
    without a mask the persistent kernel walks the narrow tile, as it does below the wide tile's
    length (persistent_rows' narrow_tile); under a causal mask the one-tile-a-CTA grid runs it."""
    if mode != "persistent":
        pytest.skip("the persistent part")
    monkeypatch.setenv("CUFLASH_FWD_TILE", "narrow")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    results = []
    names = cuda_kernels(lambda: results.append(torch.ops.cuflash_attn.fwd(q, k, v, None, causal, False)))
    assert tma_kernel(128, persistent=not causal) in names, names
    out, lse = results[0]
    check_against_reference(out, lse, q, k, v, 1 / math.sqrt(128), causal=causal)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d,tile", [(64, None), (64, "wide"), (64, "narrow"), (128, None)])
def test_persistent_ctas_walk_many_tiles(dtype, d, tile, mode, monkeypatch):
    """More tiles than SMs, so each persistent CTA takes several: of different lengths (causal),
    with no key at all (bottom-right causal with more queries than keys), GQA, and sections of
    heads as the walk's model picks them (ragged ones). Short rows, and long ones without a mask,
    which the persistent kernel takes (at head dim 64 on the wide tile where no mask is set;
    CUFLASH_FWD_TILE puts every shape on one tile there)."""
    if mode != "persistent":
        pytest.skip("persistent CTAs")
    if tile:
        monkeypatch.setenv("CUFLASH_FWD_TILE", tile)
    shapes = [(8, 16, 4, 700, 77, True, True), (4, 12, 3, 1000, 1000, True, False),
              (2, 8, 8, 300, 1900, False, False), (8, 16, 16, 1500, 1500, True, False),
              (8, 16, 4, 700, 500, False, False), (2, 8, 8, 600, 3000, False, False)]
    for batch, heads_q, heads_kv, nq, nk, causal, bottom_right in shapes:
        q = torch.randn(batch, heads_q, nq, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(batch, heads_kv, nk, d, device="cuda", dtype=dtype) for _ in range(2))
        names = cuda_kernels(lambda: torch.ops.cuflash_attn.fwd(q, k, v, None, causal, bottom_right))
        wide = {None: persistent_wide(d, causal, nq), "wide": True, "narrow": False}[tile]
        assert tma_kernel(d, wide, persistent=True, dtype=dtype) in names, names
        check_dense("cuda", dtype, batch, heads_q, heads_kv, nq, nk, d, causal=causal, bottom_right=bottom_right)


@pytest.mark.parametrize("d", [64, 128])
def test_masked_walks_on_streams_at_once(d, mode):
    """Masked forwards (short rows on the persistent kernel, long ones on the 3-D grid) on four
    streams at once, and a captured one replayed beside them: each output bitwise the one a lone
    call gives, so that no walk took another's tiles."""
    if mode != "persistent":
        pytest.skip("persistent CTAs")
    torch.manual_seed(0)
    shapes = [(4, 8, 1000, 1000, True, False, None), (8, 16, 300, 300, True, False, None),
              (2, 8, 700, 1900, False, False, (600, -1)), (2, 4, 900, 600, True, True, None),
              (1, 8, 4200, 4200, True, False, None)]
    cases = []
    for batch, heads, nq, nk, causal, bottom_right, window in shapes:
        q = torch.randn(batch, heads, nq, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, heads, nk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        left, right = window or (-1, -1)
        cases.append(lambda q=q, k=k, v=v, c=causal, br=bottom_right, lw=left, rw=right: torch.ops.cuflash_attn.fwd(
            q, k, v, None, c, br, window_left=lw, window_right=rw)[0])
    alone = [call() for call in cases]
    graph, replayed = torch.cuda.CUDAGraph(), None
    warmup = torch.cuda.Stream()
    warmup.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warmup):
        cases[0]()
    torch.cuda.current_stream().wait_stream(warmup)
    with torch.cuda.graph(graph):
        replayed = cases[0]()
    streams = [torch.cuda.Stream() for _ in range(4)]
    torch.cuda.synchronize()
    results = []
    for _ in range(3):
        graph.replay()
        for i, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                for j in range(len(cases)):
                    index = (i + j) % len(cases)
                    results.append((index, cases[index]()))
    torch.cuda.synchronize()
    assert torch.equal(replayed, alone[0])
    for index, out in results:
        assert torch.equal(out, alone[index]), index


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_wide_tile_matches_reference(dtype, d):
    """Long rows, ragged against the wide tile's 192 query rows (D=64) and 192 or 80 keys (D=128,
    256): the wide tile by default at D=64 and 256, at D=128 in the "wide" mode."""
    check_dense("cuda", dtype, 1, 2, 2, 1, 2100, d)
    check_dense("cuda", dtype, 1, 4, 2, 333, 2100, d)
    check_dense("cuda", dtype, 1, 2, 1, 300, 2300, d, causal=True, bottom_right=True)
    check_dense("cuda", dtype, 1, 2, 2, 4200, 4200, d, causal=True)
    check_dense("cuda", dtype, 1, 2, 2, 1500, 3000, d, window=(2100, -1))
    # More tiles than SMs on unmasked long rows: persistent CTAs walk several (at head dim 64; at
    # 128 and 256 the wide tile's 3-D grid).
    check_dense("cuda", dtype, 2, 12, 4, 1100, 4100, d)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128])
def test_consumers_past_the_last_query_row(dtype, d):
    """Query lengths whose last query block leaves one or two consumer warpgroups (64 rows each)
    without a row: 512 and 448 on the 192-row wide tile, 64 and 300 on the 128-row one, 1000 on
    both; with more tiles than SMs, so that persistent CTAs walk several such blocks."""
    for batch, heads, nq, nk, causal in [(4, 16, 512, 512, False), (4, 16, 448, 700, True), (2, 16, 1000, 1000, False),
                                         (8, 8, 64, 600, False), (8, 8, 300, 300, True)]:
        check_dense("cuda", dtype, batch, heads, heads, nq, nk, d, causal=causal)


def flash_rounding_baseline(q, k, v, scale, causal=False):
    """The output a correct flash kernel's roundings give: scores and softmax in float32, P rounded
    to the input dtype for P V, its sum kept in float32. The accuracy rule's baseline for large
    scales, where attention_reference in the input dtype (the scale rounded into k) errs by more
    than the output's size."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), -torch.inf)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return (p.to(q.dtype).float() @ v.float()) / p.sum(-1, keepdim=True)


def check_against_reference(out, lse, q, k, v, scale, causal=False, lse_rtol=1e-4):
    ref_out, ref_lse = attention_reference(q, k, v, causal=causal, scale=scale)
    baseline = flash_rounding_baseline(q, k, v, scale, causal)
    assert_close_to_reference("out", out, ref_out, baseline, q.dtype, factor=2, lse=ref_lse)
    rel = (lse.double() - ref_lse).abs() / ref_lse.abs().clamp(min=1.0)
    assert rel.max().item() < lse_rtol, rel.max().item()


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("scale", [-0.3, 0.0, 1e-30, 0.125, 2.0, 40.0])
def test_scales(dtype, d, scale):
    """Softmax scales of either sign and zero (torch's SDPA takes any finite one), tiny ones and
    large ones (scores past 2^8 in log2 units at 40), under a causal mask: where a kernel folds a
    positive scale into the exponent, the others go elsewhere and large products are rounded
    first."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, d, device="cuda", dtype=dtype) for _ in range(3))
    out, lse = torch.ops.cuflash_attn.fwd(q, k, v, scale, True)
    check_against_reference(out, lse, q, k, v, scale, causal=True)


def straddling_inputs(dtype, d, scale, n=256):
    """q, k, v and dout (CUDA, dtype, [1, 2, n, d]) whose rows' largest scores (times scale and
    log2 e) are about 240-277, in 16-row groups (a warp's rows) alternately all below 2^8 and
    straddling it, over a few effective keys a row."""
    torch.manual_seed(0)
    i = torch.arange(n)
    row_max = torch.where(i % 32 < 16, 250.0, torch.where(i % 2 == 0, 240.0, 272.0)).double()
    unit = torch.ones(d, dtype=torch.float64) / d**0.5
    q = ((row_max / (scale * math.log2(math.e)))[:, None] * unit).expand(1, 2, n, d)
    decay = 1 - 0.002 * torch.arange(n, dtype=torch.float64)
    k = decay[:, None] * unit + 0.01 * torch.randn(1, 2, n, d, dtype=torch.float64)
    v, dout = (torch.randn(1, 2, n, d, dtype=torch.float64) for _ in range(2))
    return tuple(t.to("cuda", dtype).contiguous() for t in (q, k, v, dout))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128])
def test_scores_straddling_2_to_the_8(dtype, d):
    """Row maxima of about 240-277 in log2 units (straddling_inputs): the folded exponent and the
    rounded-first one side by side in one tile."""
    scale = 0.5
    q, k, v, _ = straddling_inputs(dtype, d, scale)
    out, lse = torch.ops.cuflash_attn.fwd(q, k, v, scale, False)
    check_against_reference(out, lse, q, k, v, scale, lse_rtol=1e-5)


def rising_max_inputs(dtype, d, n=1000, group=64):
    """q, k, v (CUDA, dtype, [1, 2, n, d]) whose scores (times the default scale and log2 e) rise
    towards the first keys by 64-key groups: by 10 at the second, third and sixth group from the
    end, by 0.75 at each other one (7.5 over the ten after the sixth). The kernels take key blocks
    last first, so a row's max passes the one it kept by more than 8 (log2 units) at some steps
    and by less at others (where a lazy rescale keeps the max, the later groups' p grow to about
    2^7.5), and the output weighs the first few groups. In every 32 rows the second 16 are
    alternately flat (noise only) and rising: a warp whose rows disagree on the rescale."""
    torch.manual_seed(0)
    groups_from_end = (n - 1 - torch.arange(n)) // group
    jumps = torch.full((n // group + 1,), 0.75, dtype=torch.float64)
    jumps[0] = 0.0
    jumps[[1, 2, 5]] = 10.0
    rise = torch.cumsum(jumps, 0)[groups_from_end]
    i = torch.arange(n)
    gain = torch.where(i % 32 < 16, 1.0, (i % 2).double())
    unit = torch.ones(d, dtype=torch.float64) / d**0.5
    to_log2 = math.log2(math.e) / math.sqrt(d)  # the default scale times log2 e
    q = (gain / to_log2)[:, None] * unit + 0.05 * torch.randn(1, 2, n, d, dtype=torch.float64)
    k = rise[:, None] * unit + 0.3 * torch.randn(1, 2, n, d, dtype=torch.float64)
    v = torch.randn(1, 2, n, d, dtype=torch.float64)
    return tuple(t.to("cuda", dtype).contiguous() for t in (q, k, v))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("features", [False, True], ids=["plain", "zero_attn_mask"])
def test_row_max_rising_across_steps(dtype, d, causal, features):
    """Rows whose max rises step after step by more and by less than a lazy rescale's threshold
    (rising_max_inputs): every step's P V weighed against the max the row's sums are kept
    against. With a float attn_mask of zeros (the same scores) on the features kernel."""
    q, k, v = rising_max_inputs(dtype, d)
    scale = 1 / math.sqrt(d)
    mask = torch.zeros(q.shape[2], k.shape[2], device="cuda", dtype=dtype) if features else None
    out, lse = torch.ops.cuflash_attn.fwd(q, k, v, scale, causal, attn_mask=mask)
    check_against_reference(out, lse, q, k, v, scale, causal=causal)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dropout_p", [0.5, 0.998])
def test_row_max_rising_with_dropout(dtype, d, dropout_p):
    """rising_max_inputs under dropout (the features kernel): a lazily kept max (head dim 256's
    features kernels; 64 and 128 rescale eagerly) lets these rows' p reach 2^7.5, which fp16 P
    holds only while dropout's keep scale (500 at 0.998) waits for the epilogue rather than
    multiplying the kept P."""
    q, k, v = rising_max_inputs(dtype, d)
    scale = 1 / math.sqrt(d)
    rng_state = torch.tensor([1234, 99], dtype=torch.int64, device="cuda")
    keep = torch.ops.cuflash_attn.dropout_mask(rng_state, dropout_p, 1, 2, q.shape[2], k.shape[2])
    out, lse = torch.ops.cuflash_attn.fwd(q, k, v, scale, False, dropout_p=dropout_p, rng_state=rng_state)
    ref_out, ref_lse = attention_reference(q, k, v, scale=scale, dropout_keep=keep, dropout_p=dropout_p)
    pt_out, _ = attention_reference(q, k, v, scale=scale, dtype=dtype, dropout_keep=keep, dropout_p=dropout_p)
    assert torch.isfinite(out).all()
    assert_close_to_reference("out", out, ref_out, pt_out, dtype, factor=2, lse=ref_lse)
    assert_lse_close(lse, ref_lse, dtype)


@pytest.mark.parametrize("d", [64, 128])
def test_negative_scale_split_kv(d):
    """A negative scale on split-KV (a few queries over many keys): whichever kernel takes it
    splits it and combines the parts right."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 4, 2048, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, lse = torch.ops.cuflash_attn.fwd(q, k, v, -0.3, False, num_splits=4)
    check_against_reference(out, lse, q, k, v, -0.3)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gqa_and_window(dtype, d):
    check_dense("cuda", dtype, 2, 8, 2, 300, 700, d, causal=True, bottom_right=True, window=(130, -1))
    check_dense("cuda", dtype, 1, 4, 1, 500, 260, d, window=(40, 70))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_varlen(dtype, d):
    check_varlen("cuda", dtype, [70, 0, 129, 300], [90, 12, 0, 257], 4, 2, d, causal=True, bottom_right=True)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_agrees_with_sm80_kernel(d, layout, mode, monkeypatch):
    """Both kernels on the same large input: equal to within bfloat16 rounding of P. bnhd:
    [B, N, H, D] storage passed as transposed views (row stride H * D, head stride D)."""
    torch.manual_seed(0)
    shape = (2, 4, 2048, d) if layout == "bhnd" else (2, 2048, 4, d)
    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    names = cuda_kernels(lambda: torch.ops.cuflash_attn.fwd(q, k, v, None, True, False))
    assert KERNEL[mode] + "<" in names, f"{layout}: the {mode} kernel did not run: {names}"
    if mode == "persistent" and d <= 128:
        assert tma_kernel(d, persistent=True) in names, names
    out90, lse90 = torch.ops.cuflash_attn.fwd(q, k, v, None, True, False)
    monkeypatch.setenv("CUFLASH_SM90", "0")
    out80, lse80 = torch.ops.cuflash_attn.fwd(q, k, v, None, True, False)
    assert (out90.float() - out80.float()).abs().max().item() < 2e-2
    assert (lse90 - lse80).abs().max().item() < 1e-4
