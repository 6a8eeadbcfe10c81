"""CUFLASH_SM90's "persistentwindow" part (a default): long rows under a window bounded on both
sides (a sliding window, or causal with a left window: sm90::banded) on the persistent TMA
forward, whose static walk needs tiles of about one length, as rows without a mask have. Head dim
128's narrow tile below the wide tile's 4096 keys (head dim 64's long rows take the wide grid
kernel first, whose walk needs no mask at all), and with the "persistentfeatures" part (a default
too) the features' narrow tile too. The walk changes no tile's arithmetic: out and lse equal the grid
kernel's bit for bit, over more tiles than SMs."""
import pytest
import torch

from conftest import IS_SM90, SM90_DEFAULT_PARTS, sm90_parts_without
from test_features import check_dense
from test_sm90_forward import tma_kernel
from test_sm90_persistent_features import run

pytestmark = pytest.mark.skipif(not IS_SM90, reason="the TMA forward is sm_90a's")

# Windows whose middle row sees 2048 keys or more (long rows), fewer than 4096 (the narrow tile):
# (left, right, causal, queries and keys).
BANDS = {"sliding": (1100, 1100, False, 2600), "causal_left": (2100, 0, True, 4400)}


def inputs(d, dtype, heads=8, n=2600):
    torch.manual_seed(0)
    return (torch.randn(1, heads, n, d, device="cuda", dtype=dtype) for _ in range(3))


def band_options(band):
    left, right, causal, _ = BANDS[band]
    return dict(window_left=left, window_right=-1 if causal else right, is_causal=causal)


@pytest.mark.parametrize("d", [100, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("band", list(BANDS))
@pytest.mark.parametrize("features", [False, True], ids=["plain", "softcap"])
def test_equals_the_grid_kernel(d, dtype, band, features, monkeypatch):
    """8 heads of 2600 or 4400 queries: 168 or 280 tiles of 128 rows, more than an H100's or H200's
    SMs."""
    q, k, v = inputs(d, dtype, n=BANDS[band][3])
    options = band_options(band)
    if features:
        options["softcap"] = 20.0
    (out, lse), names = run(sm90_parts_without("persistentwindow"), q, k, v, monkeypatch, **options)
    (out_walked, lse_walked), names_walked = run(SM90_DEFAULT_PARTS, q, k, v, monkeypatch, **options)
    walked = tma_kernel(128, features=features, persistent=True, dtype=dtype)
    assert walked in names_walked and tma_kernel(128, features=features, dtype=dtype) in names, (names, names_walked)
    assert torch.equal(out_walked, out), (out_walked - out).abs().max()
    assert torch.equal(lse_walked, lse), (lse_walked - lse).abs().max()


def test_path_taken(monkeypatch):
    """Not under a causal mask without a left window, nor a window bounded on one side (tiles of
    unequal lengths); head dim 64 keeps the wide grid kernel; 4096 keys a row or more take the
    wide tile."""

    def kernels(d, n=2600, **options):
        q, k, v = inputs(d, torch.bfloat16, heads=2, n=n)
        return run(SM90_DEFAULT_PARTS, q, k, v, monkeypatch, **options)[1]

    assert tma_kernel(128, persistent=True) in kernels(128, **band_options("sliding"))
    causal = kernels(128, n=4200, is_causal=True)
    assert tma_kernel(128) in causal, causal
    one_sided = kernels(128, n=3000, window_left=800)  # the middle row: 2300 keys
    assert tma_kernel(128) in one_sided, one_sided
    wide_64 = kernels(64, **band_options("sliding"))
    assert tma_kernel(64, wide=True) in wide_64, wide_64
    wide_128 = kernels(128, n=9000, window_left=2100, window_right=2100)  # 4201 keys a row
    assert tma_kernel(128, wide=True) in wide_128, wide_128


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matches_reference(dtype, monkeypatch):
    """The walked kernels against the float64 reference: a sliding window, GQA, softcap and ALiBi."""
    monkeypatch.setenv("CUFLASH_SM90", SM90_DEFAULT_PARTS)
    check_dense("cuda", dtype, 1, 4, 2, 2300, 2300, 128, window=(1050, 1050))
    check_dense("cuda", dtype, 1, 2, 1, 4300, 4300, 128, causal=True, window=(2100, -1), softcap=20.0,
                alibi="batch")
