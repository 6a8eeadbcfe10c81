"""The reduced sweep that scripts/sanitize.sh runs under compute-sanitizer (not a pytest module).

Every CUDA kernel family runs forward and backward on tiny shapes: the tensor-core kernels
(float16, bfloat16: forward, delta, dQ, dK/dV) at head dims 59 (zero-padded to 64), 64, 128 and 256
(dK and dV in two launches), float32 (the same kernels on fp16 pairs after their pre-pass, on
Hopper the forward at head dim 59 on TF32 wgmmas; under CUFLASH_FP32=exact the *_simt ones) and
float64 (the CUDA-core *_simt kernels) at head dims 32, 59 and 256; under run-time switches, the
kernels no default reaches at these sizes (the cp.async Hopper forward and wgmma backward, dQ by
its own TMA kernel or by atomics, the TMA forward's wide tiles, the narrow dK/dV steps at head
dim 64, float32's 3xTF32 mma.sync kernels, and its pairs in Hopper's forward at head dims
33-64); seqlens that are not multiples of any tile, seqlen 1, causal
off, top-left and bottom-right (with rows that see no key), batch and heads 1-2, a [B, N, H, D]
strided layout, the backward with the gradient of the returned lse, and with deterministic=False
(the fused Hopper backward's unordered dQ adds) and past 512 keys (its head-dim-128 routes), and
head dim 256's fused kernel under CUFLASH_BWD_DQ=ordered and =atomic; the
KV-cache forward: paged keys (with seqused_k and flash_attn_with_kvcache's appends), split-KV and
its combine kernel (with features, paged keys and packed queries), and decoding steps (grouped
heads as rows; four causal tokens a step packed under CUFLASH_PACK_GQA=1; 130 unsplit and one split
5 ways on the TMA forwards (CUFLASH_SM90's "kvcache" part, a default; the splits under its "splits"
part), over contiguous and paged caches); packed sequences on the TMA forwards, persistent and
not, at head dim 64 on the wide tiles too (its "varlen" part), and on the TMA backward, the pair and the fused kernel's two dQ orders
(its "bwdvarlen" part, a default); softcap, ALiBi, attn_mask and dropout on the fused TMA backward
(its "bwdfeatures" part); attn_mask tiles staged by TMA in the TMA forward and backward (its
"masktma" and "bwdmasktma" parts); softcap, ALiBi and dropout on the persistent TMA forward (its
"persistentfeatures" part), and long rows under a sliding window there (its "persistentwindow"
part). Every case is checked against the float64 reference with
the accuracy rule, so a clean sanitizer run is also a correctness run.

    python3 tests/sanitize_driver.py [--list] [--only REGEX] [--case DESCRIPTION] [--device cpu]

(--device cpu runs the same cases on the CPU kernels: a check of this script without a GPU.)

Exit status: 0 all cases pass, 3 a case failed (or none ran), 2 no GPU.
"""
import argparse
import os
import re
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "benchmarks")]

import bench_attention as bench  # noqa: E402  (switches_set: run-time switches in a block)
import pytest  # noqa: E402
import torch  # noqa: E402

import reference  # noqa: E402
from conftest import SM90_DEFAULT_PARTS  # noqa: E402
from reference import LOW_PRECISION, assert_close_to_reference, assert_lse_close, reference_results  # noqa: E402
from test_accuracy import check_against_reference  # noqa: E402
from test_features import check_dense, check_varlen, make_mask  # noqa: E402
from test_kvcache import per_sequence_reference  # noqa: E402

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
NAMES = {F16: "fp16", BF16: "bf16", F32: "fp32", F64: "fp64"}


def cases():
    """(dtype, head_dim, batch, heads, seqlen_q, seqlen_k, causal, variant); variant is "",
    "dlse" (backward with the lse's gradient too), "bnhd" ([B, N, H, D] views), "features",
    "window" or "varlen" (test_features.py's checks), "float_mask" or "bool_mask" (attn_mask),
    "env:NAME=VALUE" (the plain check under that run-time switch), or a KV-cache check."""
    out = []
    for dtype in (F16, BF16):
        for d in (59, 64, 128, 256):
            out += [(dtype, d, 1, 2, 77, 200, "top_left", ""),
                    (dtype, d, 2, 1, 200, 77, "bottom_right", "dlse"),  # rows 0..122 see no key
                    (dtype, d, 1, 1, 129, 300, "none", "")]
        out += [(dtype, 64, 1, 1, 1, 1, "none", ""), (dtype, 64, 2, 2, 150, 150, "top_left", "bnhd")]
    # The fused Hopper backward's other routes: unordered dQ adds (deterministic=False: narrow and
    # wide query steps at head dim 64, head dim 128 past 512 keys a row) and the ordered one at
    # head dim 128, which runs from 512 keys seen by the middle query row.
    out += [(F16, 64, 1, 2, 77, 300, "top_left", "nondet"), (F16, 64, 2, 2, 150, 1100, "none", "nondet"),
            (BF16, 128, 1, 2, 130, 1100, "none", "nondet"), (BF16, 128, 1, 2, 130, 1100, "bottom_right", "")]
    for dtype in (F32, F64):
        for d in (59, 256):
            out += [(dtype, d, 1, 2, 77, 200, "top_left", ""), (dtype, d, 2, 1, 200, 77, "bottom_right", "dlse")]
        out += [(dtype, 32, 1, 1, 33, 65, "none", "bnhd")]
    # The feature kernels (softcap, ALiBi, dropout: the kFeatures instantiations), GQA's summing
    # dK/dV loop, windows, and packed sequences (zero lengths included).
    for dtype in (BF16, F32):
        for d in (64, 256):
            out += [(dtype, d, 2, 4, 77, 130, "bottom_right", "features"), (dtype, d, 2, 4, 77, 130, "none", "window")]
        out += [(dtype, 64, 3, 4, 0, 0, "bottom_right", "varlen")]
        # attn_mask: a float key-padding mask with its gradient, a boolean [Nq, Nk] one with GQA.
        out += [(dtype, 64, 2, 2, 77, 130, "none", "float_mask"), (dtype, 128, 2, 4, 130, 77, "top_left", "bool_mask")]
    # Kernels that only a run-time switch (csrc/cuda/run_switches.h) reaches at these sizes: the
    # float32 CUDA-core kernels, the cp.async Hopper forward and wgmma backward, dQ by its own TMA
    # kernel or by atomics, the TMA forward's wide tiles (long rows only by default), the dK/dV
    # kernel's narrow steps at head dim 64.
    for d, first, second in ((59, 77, 200), (256, 200, 77)):
        out += [(F32, d, 1, 2, first, second, "top_left", "env:CUFLASH_FP32=exact")]
    # float32 on the 3xTF32 mma.sync kernels (CUFLASH_FP32=3xtf32; the default runs fp16 pairs,
    # and on Hopper the TF32 wgmma forward at head dims 33-64), a head dim padded to its bucket
    # among them.
    out += [(F32, 64, 1, 2, 77, 200, "top_left", "env:CUFLASH_FP32=3xtf32"),
            (F32, 40, 2, 1, 200, 77, "bottom_right", "env:CUFLASH_FP32=3xtf32"),
            (F32, 128, 1, 2, 200, 77, "bottom_right", "env:CUFLASH_FP32=3xtf32"),
            (F32, 256, 1, 2, 77, 130, "none", "env:CUFLASH_FP32=3xtf32")]
    # float32 as fp16 pairs where Hopper's default forward is the TF32 wgmma one (CUFLASH_FP32=pairs).
    out += [(F32, 40, 2, 4, 77, 200, "top_left", "env:CUFLASH_FP32=pairs")]
    for dtype, d in ((BF16, 64), (F16, 128), (BF16, 256)):
        out += [(dtype, d, 1, 2, 77, 200, "top_left", "env:CUFLASH_SM90=cpasync,bwd"),
                (dtype, d, 1, 2, 77, 300, "bottom_right", "env:CUFLASH_FWD_TILE=wide")]
    for dtype, d in ((BF16, 64), (F16, 128)):
        out += [(dtype, d, 2, 2, 150, 300, "none", "env:CUFLASH_BWD_DQ=separate"),
                (dtype, d, 2, 2, 150, 300, "top_left", "env:CUFLASH_BWD_DQ=atomic")]
    # The fused head-dim-256 backward (its own kernel), both orders of the dQ adds.
    out += [(BF16, 256, 1, 4, 130, 300, "none", "env:CUFLASH_BWD_DQ=ordered"),
            (F16, 256, 2, 2, 150, 170, "top_left", "env:CUFLASH_BWD_DQ=atomic")]
    out += [(F16, 64, 1, 2, 130, 300, "top_left", "env:CUFLASH_BWD_TILE=narrow")]
    # The wide tile at head dim 128 on short rows (CUFLASH_FWD_TILE=wide): more tiles than SMs, the
    # first query block of each head seeing no key (the 3-D grid: the wide tile at 128 is not
    # persistent).
    out += [(F16, 128, 4, 16, 300, 150, "bottom_right", "env:CUFLASH_FWD_TILE=wide")]
    # Masked persistent CTAs walking several tiles of unequal lengths (192 tiles, more than SMs).
    out += [(BF16, 64, 4, 16, 300, 300, "top_left", ""), (F16, 128, 4, 16, 300, 300, "top_left", "")]
    # The KV-cache forward (16-bit; shapes are the named tests'): paged reads, split-KV and the
    # combine kernel, a decoding step whose grouped heads run as rows of one head.
    for dtype in (F16, BF16):
        out += [(dtype, 128, 4, 4, 37, 512, "bottom_right", "paged"), (dtype, 64, 3, 2, 4, 512, "bottom_right", "paged_append"),
                (dtype, 64, 3, 2, 5, 256, "none", "paged_bad_table"),
                (dtype, 64, 2, 4, 2, 512, "bottom_right", "split_paged"), (dtype, 64, 2, 4, 3, 600, "none", "split_features"),
                (dtype, 128, 2, 8, 1, 700, "bottom_right", "decode"),
                (dtype, 128, 2, 8, 4, 700, "bottom_right", "packed"),
                (dtype, 128, 2, 8, 130, 700, "bottom_right", "kvcache_tma")]
    # Packed sequences on the TMA forwards (CUFLASH_SM90's "varlen" part, named): keys ending
    # inside a key block (the next sequence's rows read, their V zeroed), empty sequences.
    out += [(BF16, d, 4, 4, 0, 0, "bottom_right", "varlen_tma") for d in (64, 128, 256)]
    out += [(BF16, 64, 4, 4, 0, 0, "none", "varlen_tma")]  # no mask: the persistent kernel's wide tile
    out += [(BF16, 128, 4, 48, 0, 0, "bottom_right", "varlen_tma")]  # 384 tiles: CTAs walk several
    # Packed sequences on the TMA backward (its "bwdvarlen" part, a default): boxes
    # past a sequence's end (their rows zeroed in shared memory, dK and dV stored row by row
    # there), empty sequences.
    out += [(BF16, d, 4, 4, 0, 0, "bottom_right", "varlen_bwd_tma") for d in (64, 128, 256)]
    # 48 K/V heads, 384 dK/dV tiles (at D=256, 80 keys a tile, more): the persistent CTAs walk
    # several, a tile at a sequence's end after another (the rows one stored, the next zeroes)
    out += [(BF16, d, 4, 96, 0, 0, "bottom_right", "varlen_bwd_tma") for d in (128, 256)]
    # softcap, ALiBi, attn_mask and dropout on the fused TMA backward (its "bwdfeatures" part, a
    # default): both orders of the dQ adds, a padded batch and packed sequences.
    out += [(F16, d, 2, 4, 150, 300, "bottom_right", "features_bwd_tma") for d in (64, 128, 256)]
    # attn_mask tiles staged by TMA in the TMA forward (its "masktma" part, a default): keys a
    # multiple of 16 (rows TMA can address), a partial last query tile and key block.
    out += [(BF16, d, 2, 4, 130, 320, "top_left", "mask_tma") for d in (64, 128, 256)]
    # And in the fused TMA backward (its "bwdmasktma" part, a default): the steps' tiles with
    # Q and dO, a partial last step and key block, both dQ orders.
    out += [(F16, d, 2, 4, 130, 320, "top_left", "mask_bwd_tma") for d in (64, 128)]
    # softcap, ALiBi and dropout on the persistent TMA forward (its "persistentfeatures" part, a
    # default): 192 tiles, more than SMs, of unequal lengths; head dim 64's wide tile (1100 keys).
    out += [(BF16, 64, 4, 16, 300, 300, "top_left", "persistent_features_tma"),
            (F16, 128, 4, 16, 300, 300, "bottom_right", "persistent_features_tma"),
            (F16, 64, 2, 8, 300, 1100, "none", "persistent_features_tma")]
    # Long rows under a sliding window on the persistent TMA forward (its "persistentwindow" part,
    # a default): 2101 keys a row, plain and softcap.
    out += [(BF16, 128, 1, 4, 2200, 2200, "none", "persistent_window_tma")]
    return out


def describe(case):
    dtype, d, b, h, nq, nk, causal, variant = case
    return f"{NAMES[dtype]} d={d} b={b} h={h} nq={nq} nk={nk} {causal}" + (f" {variant}" if variant else "")


def bnhd(batch, heads, d):
    return lambda n, device, dtype: (torch.randn(batch, n, heads, d, dtype=torch.float64)
                                     .to(device, dtype).transpose(1, 2))


def check_with_lse_gradient(device, dtype, d, b, h, nq, nk, causal, seed=0):
    """Forward and backward of out and lse together (the backward's dlse path)."""
    torch.manual_seed(seed)
    q, k, v, dout = (torch.randn(b, h, n, d, dtype=torch.float64).to(device, dtype) for n in (nq, nk, nk, nq))
    dlse = torch.randn(b, h, nq, dtype=torch.float64, device=device)
    is_causal, bottom_right = causal != "none", causal == "bottom_right"
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.cuflash_attn.fwd(qg, kg, vg, None, is_causal, bottom_right)
    grads = torch.autograd.grad((out, lse), (qg, kg, vg), (dout, dlse.to(lse.dtype)))

    ref = reference_results(q, k, v, dout, is_causal, bottom_right, dlse=dlse)
    pt = ref if dtype not in LOW_PRECISION else reference_results(q, k, v, dout, is_causal, bottom_right, dtype=dtype,
                                                                  dlse=dlse)
    assert_close_to_reference("out", out, ref[0], pt[0], dtype, factor=2)
    assert_lse_close(lse, ref[1], dtype)
    for name, got, r, p in zip(("dq", "dk", "dv"), grads, ref[2:], pt[2:]):
        assert_close_to_reference(name, got, r, p, dtype, factor=3)


def check_decode(device, dtype, d, batch, heads_q, cache_keys, num_splits, tokens=1):
    """tokens query tokens a sequence (causal past one), grouped heads (4 a KV head), cache lengths
    cache_keys and fewer."""
    from cuflash_attn.flash_attn_interface import flash_attn_with_kvcache
    torch.manual_seed(5)
    q = torch.randn(batch, tokens, heads_q, d, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(batch, cache_keys, heads_q // 4, d, device=device, dtype=dtype) for _ in range(2))
    used = torch.tensor([cache_keys - 37 * b for b in range(batch)], dtype=torch.int32, device=device)
    causal = tokens > 1
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=used, num_splits=num_splits,
                                       causal=causal, return_softmax_lse=True)
    k, v = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    ref = per_sequence_reference(q.transpose(1, 2), k, v, used, causal, torch.float64)
    pt = per_sequence_reference(q.transpose(1, 2), k, v, used, causal, dtype)
    assert_close_to_reference("out", out.transpose(1, 2), ref[0], pt[0], dtype, factor=2)
    assert_lse_close(lse, ref[1], dtype)


def run_case(case, device):
    dtype, d, b, h, nq, nk, causal, variant = case
    if device == "cpu" and dtype in LOW_PRECISION:
        pytest.skip("the low-precision kernels are CUDA's")
    if variant == "paged":
        import test_paged_kv
        test_paged_kv.test_paged_matches_reference(device, dtype, d, causal != "none")
    elif variant == "paged_bad_table":  # entries that are not pages, clamped by the kernels
        import test_paged_kv
        test_paged_kv.test_paged_table_entries_out_of_range_stay_in_bounds_on_cuda(dtype)
    elif variant == "paged_append":
        import test_paged_kv
        test_paged_kv.test_kvcache_paged_appends_and_attends(device, dtype)
    elif variant == "split_paged":
        import test_split_kv
        test_split_kv.check_split_paged_and_packed(dtype)
    elif variant == "split_features":
        import test_split_kv
        test_split_kv.test_split_with_features(dtype, "sm80")
    elif variant == "decode":
        for num_splits in (0, 1, 5):
            check_decode(device, dtype, d, b, h, nk, num_splits)
    elif variant == "packed":
        with bench.switches_set({"CUFLASH_PACK_GQA": "1"}):
            for num_splits in (0, 1, 5):
                check_decode(device, dtype, d, b, h, nk, num_splits, tokens=nq)
    elif variant.endswith("_tma") and os.environ.get("CUFLASH_SM90") == "0":  # (the TMA kernels' cases)
        pytest.skip("the Hopper kernels are off (--without-tma)")
    elif variant == "kvcache_tma":  # the TMA forwards, persistent and not, over KV caches; splits
        import test_paged_kv
        for parts in ("tma,persistent,kvcache", "tma,kvcache,splits"):
            with bench.switches_set({"CUFLASH_SM90": parts}):
                check_decode(device, dtype, d, b, h, nk, 1, tokens=nq)
                check_decode(device, dtype, d, b, h, nk, 5)  # one token, 5 splits
                test_paged_kv.test_paged_matches_reference(device, dtype, d, True)
    elif variant == "features":  # GQA 4/2, window, softcap, ALiBi per batch, dropout
        check_dense(device, dtype, b, h, h // 2, nq, nk, d, causal=causal != "none", bottom_right=True,
                    window=(40, -1), softcap=15.0, alibi="batch", dropout_p=0.2)
    elif variant == "nondet":
        check_dense(device, dtype, b, h, h, nq, nk, d, causal=causal != "none", bottom_right=causal == "bottom_right",
                    deterministic=False)
    elif variant == "window":
        check_dense(device, dtype, b, h, 1, nq, nk, d, window=(9, 4), bottom_right=False)
    elif variant == "varlen_tma":  # the TMA forwards over packed sequences, persistent and not
        runs = [{"CUFLASH_SM90": parts} for parts in ("tma,varlen", "tma,persistent,varlen")]
        if d == 64:  # the wide tiles (192 query rows a tile) under a mask too
            runs += [dict(run, CUFLASH_FWD_TILE="wide") for run in runs]
        for run in runs:
            with bench.switches_set(run):
                check_varlen(device, dtype, [70, 0, 129, 200], [90, 12, 0, 130], h, 2, d, causal=causal != "none",
                             bottom_right=True)
    elif variant == "varlen_bwd_tma":  # the TMA backward over packed sequences: the pair, the fused kernel's orders
        parts = SM90_DEFAULT_PARTS
        for dq in ("separate", "ordered", "atomic"):
            steps = "CUFLASH_BWD_TILE" if dq == "separate" else "CUFLASH_BWD_FUSED_TILE"
            for step in ("wide", "narrow") if d == 64 else ("",):  # 128- or 64-query steps
                with bench.switches_set({"CUFLASH_SM90": parts, "CUFLASH_BWD_DQ": dq, steps: step}):
                    check_varlen(device, dtype, [70, 0, 129, 200], [90, 12, 0, 130], h, h // 2, d,
                                 causal=causal != "none", bottom_right=True)
    elif variant == "features_bwd_tma":  # the fused TMA backward with the features, both dQ orders
        for dq in ("ordered", "atomic"):
            with bench.switches_set({"CUFLASH_SM90": SM90_DEFAULT_PARTS, "CUFLASH_BWD_DQ": dq}):
                check_dense(device, dtype, b, h, h // 2, nq, nk, d, causal=True, bottom_right=True, window=(60, -1),
                            softcap=15.0, alibi="batch", dropout_p=0.2, attn_mask=("bool", "B1LS"))
                check_varlen(device, dtype, [70, 0, 129, 200], [90, 12, 0, 130], h, 2, d, causal=True,
                             bottom_right=True, softcap=10.0, dropout_p=0.1)
    elif variant == "persistent_features_tma":  # without dropout and a mask, head dim 64's wide tile where it pays
        with bench.switches_set({"CUFLASH_SM90": SM90_DEFAULT_PARTS}):
            for dropout_p in (0.2, 0.0) if causal == "none" else (0.2,):
                check_dense(device, dtype, b, h, h // 2, nq, nk, d, causal=causal != "none",
                            bottom_right=causal == "bottom_right", softcap=15.0, alibi="batch", dropout_p=dropout_p)
    elif variant == "persistent_window_tma":
        with bench.switches_set({"CUFLASH_SM90": SM90_DEFAULT_PARTS}):
            check_dense(device, dtype, b, h, h // 2, nq, nk, d, window=(1050, 1050))
            check_dense(device, dtype, b, h, h // 2, nq, nk, d, window=(1050, 1050), softcap=15.0)
    elif variant == "mask_tma":  # float per-row masks and bool key padding; head dim 64's wide tile too
        runs = [{"CUFLASH_SM90": SM90_DEFAULT_PARTS}]
        if d == 64:
            runs.append(dict(runs[0], CUFLASH_FWD_TILE="wide"))
        for run in runs:
            with bench.switches_set(run):
                check_dense(device, dtype, b, h, h // 2, nq, nk, d, attn_mask=("float", "B1LS"), causal=causal != "none")
                check_dense(device, dtype, b, h, h, nq, nk, d, attn_mask=("bool", "B11S"), softcap=15.0)
    elif variant == "mask_bwd_tma":  # float per-row masks (no gradient) and bool key padding, GQA, softcap
        float_mask = make_mask("float", (b, 1, nq, nk), device, dtype)
        for dq in ("ordered", "atomic"):
            with bench.switches_set({"CUFLASH_SM90": SM90_DEFAULT_PARTS, "CUFLASH_BWD_DQ": dq}):
                check_dense(device, dtype, b, h, h // 2, nq, nk, d, attn_mask=float_mask, causal=causal != "none")
                check_dense(device, dtype, b, h, h, nq, nk, d, attn_mask=("bool", "B11S"), softcap=15.0)
    elif variant == "varlen":
        check_varlen(device, dtype, [70, 0, 129], [90, 12, 0], h, 2, d, causal=True, bottom_right=True,
                     softcap=10.0, dropout_p=0.1)
    elif variant in ("float_mask", "bool_mask"):
        kind = variant.split("_")[0]
        check_dense(device, dtype, b, h, h // 2 if kind == "bool" else h, nq, nk, d,
                    attn_mask=(kind, "B11S" if kind == "float" else "LS"), causal=causal != "none")
    elif variant.startswith("env:"):  # NAME=VALUE: the plain check under that switch
        name, value = variant[len("env:"):].split("=", 1)
        with bench.switches_set({name: value}):
            check_against_reference(device, dtype, b, h, nq, nk, d, causal)
    elif variant == "dlse":
        check_with_lse_gradient(device, dtype, d, b, h, nq, nk, causal)
    else:
        layout = bnhd(b, h, d) if variant == "bnhd" else None
        check_against_reference(device, dtype, b, h, nq, nk, d, causal, layout=layout)
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--only", default="", help="run the cases whose description matches this regex")
    parser.add_argument("--case", default=None, help="run the one case with exactly this description")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--reference-on-device", action="store_true",
                        help="compute the references (float64, and the float16/bfloat16 baselines) with torch's ops "
                             "on the GPU; by default on the CPU: on a Hopper GPU racecheck stops with an internal "
                             "error in torch's float16 matmuls, and initcheck watches fewer kernels")
    parser.add_argument("--without-tma", action="store_true",
                        help="the Hopper kernels off (CUFLASH_SM90=0), the cases that ask for them skipped: for "
                             "initcheck, which does not see TMA's bulk stores")
    args = parser.parse_args()
    if args.without_tma:
        os.environ["CUFLASH_SM90"] = "0"
    if not args.reference_on_device:
        reference.REFERENCE_DEVICE = "cpu"
    selected = [c for c in cases() if re.search(args.only, describe(c)) and args.case in (None, describe(c))]
    if args.list:
        print("\n".join(describe(c) for c in selected))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize_driver: needs a CUDA GPU")
        return 2
    passed, failed, skipped = 0, [], 0
    start = time.time()
    for i, case in enumerate(selected, 1):
        t0 = time.time()
        try:
            run_case(case, args.device)
            status = "ok"
            passed += 1
        except NotImplementedError as e:  # a head dim left out of this build (CUFLASH_HEAD_DIMS)
            status = f"skipped: {str(e).splitlines()[0]}"
            skipped += 1
        except pytest.skip.Exception as e:  # a named test's own skip (e.g. 16-bit on the CPU)
            status = f"skipped: {e.msg}"
            skipped += 1
        except Exception as e:  # noqa: BLE001  (report every case, then fail)
            status = f"FAILED: {type(e).__name__}: {e}"
            failed.append(describe(case))
            traceback.print_exc()
        print(f"[{i:2d}/{len(selected)}] {describe(case):<42} {status} ({time.time() - t0:.1f} s)", flush=True)
    print(f"sanitize_driver: {len(selected)} cases, {passed} passed, {len(failed)} failed, {skipped} skipped "
          f"in {time.time() - start:.0f} s")
    for name in failed:
        print(f"  failed: {name}")
    return 3 if failed or passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
