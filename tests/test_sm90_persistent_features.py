"""CUFLASH_SM90's "persistentfeatures" part (a default): softcap, ALiBi and dropout on the
persistent TMA forward (one CTA per SM walking tiles; flash_fwd_sm90_tma.cuh's kPersistent) at
head dims up to 128, wherever plain attention walks persistently: short rows and, without a mask,
longer ones (sm90::features_persistent_rows); head dim 64's wide features tile, where it pays,
walks persistently without a mask. An attn_mask keeps its staged kernel, which has no persistent
form. The walk changes no tile's arithmetic: out and lse equal the one-tile-a-CTA kernel's bit
for bit (which test_sm90_forward.py checks against the float64 reference; one reference check
here too), over more tiles than SMs, ragged last query blocks, GQA and the masks."""
import pytest
import torch

from conftest import IS_SM90, SM90_DEFAULT_PARTS, cuda_kernels, sm90_parts_without
from test_features import check_dense, make_mask
from test_sm90_forward import bucket, tma_kernel

pytestmark = pytest.mark.skipif(not IS_SM90, reason="the TMA forward is sm_90a's")

GRID = sm90_parts_without("persistentfeatures")  # the one-tile-a-CTA features kernels
fwd = torch.ops.cuflash_attn.fwd


def inputs(batch, heads, heads_kv, nq, nk, d, dtype=torch.bfloat16):
    torch.manual_seed(0)
    make = lambda h, n: torch.randn(batch, h, n, d, device="cuda", dtype=dtype)  # noqa: E731
    return make(heads, nq), make(heads_kv, nk), make(heads_kv, nk)


def run(parts, q, k, v, monkeypatch, **options):
    """(out, lse) under CUFLASH_SM90=parts, and the names of the kernels the call launched."""
    monkeypatch.setenv("CUFLASH_SM90", parts)
    monkeypatch.delenv("CUFLASH_FWD_TILE", raising=False)
    result = []
    names = cuda_kernels(lambda: result.extend(fwd(q, k, v, **options)))
    return result, names


@pytest.mark.parametrize("d", [40, 64, 100, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("features", ["softcap", "alibi", "dropout", "all"])
@pytest.mark.parametrize("mask", ["none", "causal", "bottom_right", "window"])
def test_equals_the_grid_kernel(d, dtype, features, mask, monkeypatch):
    """3 x 8 heads over 2, 700 queries (a ragged last block) over 900 keys: 198 tiles of 128 rows,
    more than an H100's or H200's SMs, so that CTAs walk several, of unequal lengths where masked."""
    q, k, v = inputs(3, 8, 2, 700, 900, d, dtype)
    options = dict(is_causal=mask in ("causal", "bottom_right"), bottom_right=mask == "bottom_right")
    if mask == "window":
        options.update(window_left=100, window_right=20)
    if features in ("softcap", "all"):
        options["softcap"] = 20.0
    if features in ("alibi", "all"):
        options["alibi_slopes"] = torch.rand(3, 8, device="cuda")
    if features in ("dropout", "all"):
        options.update(dropout_p=0.2, rng_state=torch.tensor([7, 0], dtype=torch.int64, device="cuda"))
    (out, lse), names = run(GRID, q, k, v, monkeypatch, **options)
    (out_walked, lse_walked), names_walked = run(SM90_DEFAULT_PARTS, q, k, v, monkeypatch, **options)
    walked = tma_kernel(bucket(d), features=True, persistent=True, dtype=dtype)
    assert walked in names_walked and walked not in names, (names, names_walked)
    assert torch.equal(out_walked, out), (out_walked - out).abs().max()
    assert torch.equal(lse_walked, lse), (lse_walked - lse).abs().max()
    assert out.isfinite().all()


@pytest.mark.parametrize("d", [40, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("features", ["softcap", "alibi", "both"])
def test_wide_tile_equals_the_grid_kernel(d, dtype, features, monkeypatch):
    """Head dim 64's wide features tile (192 query rows, three consumers), walked: 8 x 8 heads over
    2, 500 queries (a ragged last block) over 1500 keys: 192 tiles, more than SMs."""
    q, k, v = inputs(8, 8, 2, 500, 1500, d, dtype)
    options = {}
    if features in ("softcap", "both"):
        options["softcap"] = 20.0
    if features in ("alibi", "both"):
        options["alibi_slopes"] = torch.rand(8, device="cuda")  # one slope a head
    (out, lse), names = run(GRID, q, k, v, monkeypatch, **options)
    (out_walked, lse_walked), names_walked = run(SM90_DEFAULT_PARTS, q, k, v, monkeypatch, **options)
    walked = tma_kernel(64, wide=True, features=True, persistent=True, dtype=dtype)
    assert walked in names_walked and tma_kernel(64, wide=True, features=True, dtype=dtype) in names, \
        (names, names_walked)
    assert torch.equal(out_walked, out), (out_walked - out).abs().max()
    assert torch.equal(lse_walked, lse), (lse_walked - lse).abs().max()


@pytest.mark.parametrize("d", [64, 128])
def test_path_taken(d, monkeypatch):
    """Where the part walks the features persistently and where not: long rows under a causal
    mask (the static walk's balance, as for plain attention), an attn_mask (its staged kernel);
    at head dim 64 the wide tile where it pays (1024 keys or more, without dropout), walked
    without a mask."""
    def kernels(nq, nk, **options):
        q, k, v = inputs(1, 2, 2, nq, nk, d)
        return run(SM90_DEFAULT_PARTS, q, k, v, monkeypatch, **options)[1]

    walked = tma_kernel(d, features=True, persistent=True)
    assert walked in kernels(300, 300, softcap=30.0)
    assert walked in kernels(300, 4096, dropout_p=0.1, rng_state=torch.tensor([1, 0], device="cuda"))
    causal_long = kernels(300, 4096, dropout_p=0.1, rng_state=torch.tensor([1, 0], device="cuda"), is_causal=True,
                          bottom_right=True)  # rows of ~3950 keys; dropout: not head dim 64's wide tile
    assert tma_kernel(d, features=True) in causal_long, causal_long
    long_rows = kernels(300, 4096, softcap=30.0)  # head dim 64: the wide tile, walked too
    assert tma_kernel(d, wide=d == 64, features=True, persistent=True) in long_rows, long_rows
    if d == 64:  # the wide tile under a causal mask: the grid
        causal = kernels(300, 4096, softcap=30.0, is_causal=True, bottom_right=True)
        assert tma_kernel(d, wide=True, features=True) in causal, causal
    mask = make_mask("float", (1, 1, 300, 320), "cuda", torch.bfloat16)
    masked = kernels(300, 320, attn_mask=mask)
    assert tma_kernel(d, features=True, staged_mask=True) in masked, masked


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matches_reference(d, dtype, monkeypatch):
    """The part's kernel against the float64 reference (forward and, through it, the backward's
    logsumexp): GQA, a window, softcap, ALiBi and dropout together."""
    monkeypatch.setenv("CUFLASH_SM90", SM90_DEFAULT_PARTS)
    check_dense("cuda", dtype, 2, 8, 2, 150, 300, d, causal=True, bottom_right=True, window=(60, -1),
                softcap=20.0, alibi="batch", dropout_p=0.2)
    check_dense("cuda", dtype, 1, 4, 1, 200, 333, d, softcap=15.0, alibi="batch")
