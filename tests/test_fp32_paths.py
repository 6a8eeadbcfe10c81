"""float32 on CUDA runs four kernel families: by default the sm_80-class tensor-core kernels on
the inputs split into scaled fp16 pairs by a pre-pass (csrc/cuda/fp32_pairs.h), three fp16
products for each, where their shared memory fits, and on Hopper the forward of plain attention
at head dims 33-64 on TF32 wgmmas in 3xTF32 (sm90/flash_fwd_sm90_fp32.cuh); elsewhere, and
everywhere under CUFLASH_FP32=3xtf32, the sm_80-class kernels with each product split into three
TF32 ones (3xTF32, csrc/cuda/mma_sm80.cuh); under CUFLASH_FP32=pairs the pairs wherever they fit,
Hopper's forward too; under CUFLASH_FP32=exact the CUDA-core kernels (flash_simt_kernel.cuh).
All are held to the float32 accuracy rule (1e-5 relative, no TF32) over the shapes that stress
the tiles (ragged ends, one row, causal both ways, GQA, every head-dim bucket), the features and
varlen; the kernels that ran are the ones the switch names; and without memory for the pairs'
scratch the 3xTF32 kernels run instead."""
import sys
from pathlib import Path

import pytest
import torch

from conftest import HAS_CUDA, IS_SM90, cuda_kernels
from reference import accuracy_bound, max_err, reference_results
from test_accuracy import check_against_reference
from test_features import check_dense, check_varlen

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import analyze_io  # noqa: E402  (reads csrc/cuda/tile_shapes.h)

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def tiles_fit(bucket, pairs=False):
    """(forward, backward): whether float32's tiles at this head-dim bucket fit this GPU's shared
    memory per block (flash_launch.cuh's fp32_on_tensor_cores; fp32_pairs.cu's
    fp32_pair_scratch_bytes): the kernels' shared memory from tile_shapes.h's float32 tiles, rows
    padded by 8 elements as SmemTile's (pairs: by 4, PairTile's rows of 2 x bucket halves + 8, and
    each row's staged scale)."""
    tiles = analyze_io.tile_shapes(bucket, elem_bytes=4, pairs=pairs)
    f, b, row = tiles["FwdTile"], tiles["BwdTile"], (bucket + (4 if pairs else 8)) * 4
    # Pairs: + a float a row of each tile staged (the rows' scales; a K/V or Q/dout tile two buffers).
    forward = (f["kBlockM"] + 4 * f["kBlockN"]) * (row + (4 if pairs else 0))
    dq = (2 * b["kDqBlockM"] + 4 * b["kDqBlockN"]) * (row + (4 if pairs else 0))
    dkdv = (2 * b["kDkvBlockN"] + 4 * b["kDkvBlockM"]) * (row + (4 if pairs else 0)) + 4 * b["kDkvBlockM"] * 4
    limit = torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin
    return forward <= limit, max(dq, dkdv) <= limit


@pytest.fixture(params=["", "exact", "3xtf32", "pairs"], ids=["default", "exact", "mma_sync", "pairs"], autouse=True)
def fp32_path(request, monkeypatch):
    monkeypatch.setenv("CUFLASH_FP32", request.param)  # read at every call
    return request.param


def kernels_of(d, q_offset=0):
    """The kernels of a forward and backward at head dim d; q_offset > 0 starts q that many
    elements into its storage (a layout the tensor-core kernels cannot address)."""
    make = lambda: torch.randn(1, 2, 100, d, device="cuda", dtype=torch.float32)  # noqa: E731
    q, k, v = make(), make(), make()
    out, lse = torch.ops.cuflash_attn.fwd(q, k, v, None, False, False)
    dout = torch.randn_like(out)
    if q_offset:
        q = torch.randn(q.numel() + q_offset, device="cuda")[q_offset:].view_as(q)
    return cuda_kernels(lambda: (torch.ops.cuflash_attn.fwd(q, k, v, None, False, False),
                                 torch.ops.cuflash_attn.bwd(dout, q, k, v, out, lse)))


@pytest.mark.parametrize("d", [16, 40, 64, 100, 128, 200, 256])
def test_path_taken(d, fp32_path):
    names = kernels_of(d)
    bucket = 32 if d <= 32 else 64 if d <= 64 else 128 if d <= 128 else 256
    tensor_fwd = f"flash_fwd_kernel<float, {bucket}, false, "  # then its tile
    tensor_bwd = (f"flash_bwd_dq_kernel<float, {bucket}, false>", "flash_bwd_dkdv_kernel<float")
    if fp32_path == "exact":
        assert "flash_fwd_simt_kernel<float" in names and "flash_bwd_dkdv_simt_kernel<float" in names, names
        assert tensor_fwd not in names and tensor_bwd[0] not in names, names
        return
    fwd_fits, bwd_fits = tiles_fit(bucket)  # 203 KiB at 256 backward: an H100's, not an A100's
    fwd_pairs, bwd_pairs = tiles_fit(bucket, pairs=True) if fp32_path in ("", "pairs") else (False, False)
    wgmma_runs = IS_SM90 and bucket == 64 and fwd_fits and fp32_path != "3xtf32"
    if fp32_path == "":  # Hopper's TF32 wgmma forward keeps what it takes
        fwd_pairs = fwd_pairs and not wgmma_runs
    on_wgmma = wgmma_runs and not fwd_pairs
    pair_bwd = (f"flash_bwd_dq_kernel<cuflash::Fp32Pair, {bucket}, false>", "flash_bwd_dkdv_kernel<cuflash::Fp32Pair")
    assert (f"flash_fwd_kernel<cuflash::Fp32Pair, {bucket}, false, " in names) == fwd_pairs, names
    assert all(name in names for name in pair_bwd) == bwd_pairs, names
    assert ("fp32_pair_split_kernel" in names) == (fwd_pairs or bwd_pairs), names
    assert ("flash_fwd_sm90_fp32_kernel" in names) == on_wgmma, names
    assert (tensor_fwd in names) == (fwd_fits and not on_wgmma and not fwd_pairs), names
    assert ("flash_fwd_simt_kernel" in names) == (not fwd_fits and not fwd_pairs), names
    assert all(name in names for name in tensor_bwd) == (bwd_fits and not bwd_pairs), names
    assert ("flash_bwd_dkdv_simt_kernel" in names) == (not bwd_fits and not bwd_pairs), names


def test_unaligned_inputs_are_copied_onto_the_tensor_cores(fp32_path):
    """q starting 4 bytes into its storage: the torch glue copies it to an aligned tensor, so the
    default still runs the tensor-core kernels (the kernels' own check, tensor_core_layout, is
    for the C++ API, which passes such pointers through)."""
    if fp32_path == "exact":
        pytest.skip("the tensor-core kernels' case")
    names = kernels_of(64, q_offset=1)
    forward = {"": "flash_fwd_sm90_fp32_kernel" if IS_SM90 else "flash_fwd_kernel<cuflash::Fp32Pair, 64, false, ",
               "3xtf32": "flash_fwd_kernel<float, 64, false, ",
               "pairs": "flash_fwd_kernel<cuflash::Fp32Pair, 64, false, "}[fp32_path]
    assert forward in names and "simt" not in names, names


def test_pairs_give_way_to_3xtf32_where_their_scratch_does_not_fit(fp32_path, monkeypatch):
    """With no device memory left for the pairs' scratch (the size of the inputs), the forward
    and backward run the 3xTF32 kernels instead of failing (torch_ops.cpp's
    fp32_pair_scratch_for): bitwise what CUFLASH_FP32=3xtf32 gives. The allocator's limit
    (set_per_process_memory_fraction) leaves room for each call's outputs, not for its scratch;
    every tensor is 16 MiB, so that the caching allocator sizes each segment to its tensor."""
    if fp32_path not in ("", "pairs") or torch.cuda.get_allocator_backend() != "native":
        pytest.skip("the pairs' case, under the native caching allocator")
    if not all(tiles_fit(128, pairs=True)):
        pytest.skip("no pair kernels at head dim 128 on this GPU")
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(1, 8, 4096, 128, device="cuda") for _ in range(4))
    ops = torch.ops.cuflash_attn
    total = torch.cuda.get_device_properties(q.device).total_memory

    def run(margins_mib=(None, None)):
        """Out, lse, dq, dk, dv and the kernels' names; each call's new segments limited to its
        margin over the memory reserved before it, where one is given."""
        names = []

        def call(margin_mib, fn):
            if margin_mib is not None:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + margin_mib * 2**20) / total)
            try:
                got = []
                names.append(cuda_kernels(lambda: got.append(fn())))
                return got[0]
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0)

        # The forward: out (16 MiB) and lse (a 2 MiB small-block segment), not the 48 MiB scratch;
        # the backward: dq, dk, dv (48 MiB) and delta, not the 64 MiB scratch.
        out, lse = call(margins_mib[0], lambda: ops.fwd(q, k, v, None, True, False))
        grads = call(margins_mib[1], lambda: ops.bwd(dout, q, k, v, out, lse, None, None, True, False)[:3])
        return (out, lse, *grads), " ".join(names)

    _, names = run()
    assert "Fp32Pair" in names, names  # with the memory, the pairs run
    monkeypatch.setenv("CUFLASH_FP32", "3xtf32")
    expected, _ = run()
    monkeypatch.setenv("CUFLASH_FP32", fp32_path)
    got, names = run(margins_mib=(26, 58))
    assert "Fp32Pair" not in names and "fp32_pair_split_kernel" not in names, names
    assert "flash_fwd_kernel<float, 128" in names and "flash_bwd_dkdv_kernel<float, 128" in names, names
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("d", [16, 40, 64, 128, 256])
@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 300), (77, 200), (200, 77), (128, 128), (257, 513)])
@pytest.mark.parametrize("causal,bottom_right", [(False, False), (True, False), (True, True)],
                         ids=["full", "causal", "causal_br"])
def test_accuracy(d, nq, nk, causal, bottom_right):
    check_dense("cuda", torch.float32, 2, 2, 2, nq, nk, d, causal=causal, bottom_right=bottom_right)


@pytest.mark.parametrize("heads_q,heads_kv", [(4, 2), (6, 1)])
def test_gqa(heads_q, heads_kv):
    check_dense("cuda", torch.float32, 2, heads_q, heads_kv, 77, 130, 64, causal=True, bottom_right=True)


@pytest.mark.parametrize("features", [dict(softcap=10.0), dict(alibi="batch", causal=True),
                                      dict(window=(20, 5)), dict(dropout_p=0.2),
                                      dict(attn_mask=("float", "B1LS")), dict(attn_mask=("bool", "BHLS"))],
                         ids=["softcap", "alibi", "window", "dropout", "float_mask", "bool_mask"])
@pytest.mark.parametrize("d", [64, 128])
def test_features(features, d):
    check_dense("cuda", torch.float32, 2, 4, 2, 130, 77, d, **features)


def test_varlen():
    check_varlen("cuda", torch.float32, [70, 0, 129], [90, 12, 64], 4, 1, 96, causal=True, bottom_right=True,
                 window=(20, -1), softcap=10.0, alibi="batch", dropout_p=0.2)


def test_varlen_plain():
    """Packed sequences (an empty one included) without the features: on Hopper's float32 wgmma
    forward by default at head dim 64."""
    check_varlen("cuda", torch.float32, [70, 0, 129], [90, 12, 64], 4, 1, 64, causal=True, bottom_right=True,
                 window=(20, -1))


@pytest.mark.parametrize("d", [64, 128])
def test_long_rows(d):
    """4096 keys a row: the accumulators' drift over a long row stays within the float32 rule."""
    check_dense("cuda", torch.float32, 1, 2, 2, 256, 4096, d)


@pytest.mark.parametrize("scales", [(1, 1, 1e20, 1e-20), (1e-3, 1e-3, 1e-30, 1e25)], ids=["v_large", "v_tiny"])
def test_inputs_far_from_unit_scale(scales):
    """q, k, v and dout each at its own scale, far from 1 (the pair kernels split each row at a
    power of two of its own, fp16 having 5 exponent bits): out, dv and the score gradients each
    near a different power of ten, all within the float32 rule."""
    scale = iter(scales)
    layout = lambda n, device, dtype: (next(scale) * torch.randn(1, 2, n, 64, dtype=torch.float64)).to(device, dtype)  # noqa: E731
    check_against_reference("cuda", torch.float32, 1, 2, 200, 300, 64, "none", layout=layout)


def test_garbage_in_keys_no_query_sees():
    """Rows of k and v at 1e20 where a causal mask hides them from every query (keys past the
    last query's, top-left): a padded or stale cache's rows. The rest within the rule, as if
    they were not there (the pair kernels split each row at a power of two of its own, so a
    row's magnitude costs no other row bits)."""
    made = iter(range(4))

    def layout(n, device, dtype):
        x = torch.randn(1, 2, n, 64, dtype=torch.float64)
        if next(made) in (1, 2):  # k and v: rows 110 and 125 of 130
            x[:, :, [110, 125]] *= 1e20
        return x.to(device, dtype)
    check_against_reference("cuda", torch.float32, 1, 2, 100, 130, 64, "top_left", layout=layout)


def test_each_head_within_the_rule_at_its_own_scale():
    """Heads whose v differ by 1e12 (dout the other way): each head's out and gradients within
    1e-5 of its own largest value, which the rule over the whole tensor would not see (the pair
    kernels scale each row by its own power of two)."""
    torch.manual_seed(0)
    s = torch.tensor([1.0, 1e-12], dtype=torch.float64).view(1, 2, 1, 1)
    q, k = (torch.randn(1, 2, n, 64, dtype=torch.float64) for n in (150, 230))
    v, dout = s * torch.randn(1, 2, 230, 64, dtype=torch.float64), torch.randn(1, 2, 150, 64, dtype=torch.float64) / s
    got_in = [t.cuda().float().requires_grad_() for t in (q, k, v)]
    out, _ = torch.ops.cuflash_attn.fwd(*got_in, None, False, False)
    got = (out, *torch.autograd.grad(out, got_in, dout.cuda().float()))
    ref_out, _, *ref_grads = reference_results(q, k, v, dout)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, (ref_out, *ref_grads)):
        for h in range(2):
            bound = accuracy_bound(r[:, h], r[:, h], torch.float32, factor=1)
            assert max_err(g[:, h].double().cpu(), r[:, h]) <= bound, f"{name}, head {h}"


def test_large_scores_keep_the_fp32_bound():
    """Inputs 3x larger (scores up to ~40): 3xTF32's products keep fp32's relative error, so the
    1e-5 bound holds where one TF32 product (2^-11 each) would not."""
    layout = lambda n, device, dtype: (3 * torch.randn(1, 2, n, 64, dtype=torch.float64)).to(device, dtype)  # noqa: E731
    check_against_reference("cuda", torch.float32, 1, 2, 200, 300, 64, "none", layout=layout)
