"""benchmarks/analyze_io.py: the IO models on hand-computed cases, the tile-shape parser, and the
Nsight Compute CSV parser on output written the way ncu 2025.x writes it. CPU only."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import analyze_io as aio  # noqa: E402


def cfg(n=256, d=64, causal=False, dtype="bf16", batch=1, heads=1):
    return {"dtype": dtype, "batch": batch, "heads": heads, "seqlen_q": n, "seqlen_k": n,
            "head_dim": d, "causal": causal}


def test_standard_model_by_hand():
    # N = 256, D = 64, 2-byte elements, per head: fwd reads Q, K, V, S, P; writes S, P, O.
    n, d = 256, 64
    std = aio.standard_model(cfg(n, d, batch=2, heads=3))
    assert std["fwd"] == {"read": 6 * 2 * (3 * n * d + 2 * n * n), "write": 6 * 2 * (n * d + 2 * n * n)}
    # bwd: 5 N^2 + 5 N D read, 2 N^2 + 3 N D written (Algorithm 3)
    assert std["bwd"] == {"read": 6 * 2 * (5 * n * n + 5 * n * d), "write": 6 * 2 * (2 * n * n + 3 * n * d)}
    assert aio.standard_model(cfg(n, d, causal=True)) == aio.standard_model(cfg(n, d))


def test_tiled_streams_by_hand():
    # 256 queries in blocks of 64, keys in blocks of 128: each query block loads all 256 keys.
    assert aio.stream_keys(256, 256, 64, 128, causal=False) == (256, 4 * 256)
    # Causal: query block m sees keys < 64 (m + 1), rounded up to whole 128-key blocks:
    # 128, 128, 256, 256.
    assert aio.stream_keys(256, 256, 64, 128, causal=True) == (256, 768)
    # Keys resident in blocks of 64, queries streamed in blocks of 32: causal key block n
    # streams queries from 64 n: 256 + 192 + 128 + 64.
    assert aio.stream_queries(256, 256, 32, 64, causal=False) == (256, 4 * 256)
    assert aio.stream_queries(256, 256, 32, 64, causal=True) == (256, 640)
    # A ragged end: 100 queries, 100 keys, blocks of 64: the last blocks are 36 rows.
    assert aio.stream_keys(100, 100, 64, 64, causal=False) == (100, 200)


def test_tiled_forward_uses_the_header_tiles():
    c = cfg(1024, 64, batch=2, heads=2)
    launches, tiles = aio.tiled_kernels(c)
    bm, bn = tiles["fwd"]
    fwd = launches[0]
    assert fwd["kernel"] == "flash_fwd_kernel" and fwd["phase"] == "fwd"
    row = 64 * 2
    assert fwd["read"] == 4 * (1024 * row + -(-1024 // bm) * 1024 * 2 * row)
    assert fwd["write"] == 4 * (1024 * row + 1024 * 4)
    assert [k["kernel"] for k in launches[1:]] == ["flash_bwd_delta_kernel", "flash_bwd_dq_kernel",
                                                   "flash_bwd_dkdv_kernel"]
    # the tiled kernels never move less than the minimum
    low, tiled = aio.min_model(c), aio.tiled_model(c)
    for phase in ("fwd", "bwd"):
        assert tiled[phase]["read"] >= low[phase]["read"]
        assert tiled[phase]["write"] >= low[phase]["write"]


def test_split_dkdv_above_128():
    launches, tiles = aio.tiled_kernels(cfg(512, 256))
    if tiles["split"]:
        dkdv = [k for k in launches if k["kernel"] == "flash_bwd_dkdv_kernel"]
        assert len(dkdv) == 2 and dkdv[0]["read"] - dkdv[1]["read"] == 512 * 256 * 2  # V, once


def test_cpp_expression_evaluator():
    names = {"kHeadDim": 160, "kWarps": 4}
    assert aio.eval_cpp_expr("kHeadDim <= 64 ? 128 : kHeadDim <= 128 ? 64 : 32", names) == 32
    assert aio.eval_cpp_expr("16 * kWarps", names) == 64
    assert aio.eval_cpp_expr("kHeadDim > 128", names) is True
    assert aio.eval_cpp_expr("(kHeadDim + 31) / 32 * 32 - 1", names) == 159
    assert aio.eval_cpp_expr("!(kWarps == 4) || kHeadDim % 32 != 0", names) is False
    with pytest.raises(ValueError):
        aio.eval_cpp_expr("std::max(kHeadDim, 64)", names)


def test_tile_header_parser():
    header = """
    template <int kHeadDim>
    struct FwdTile {
      static constexpr int kWarps = 4;
      static constexpr int kBlockM = 16 * kWarps;  // rows
      // a comment with = and ; in it;
      static constexpr int kBlockN = kHeadDim <= 64 ? 128
                                   : 64;
    };
    template <int kHeadDim>
    struct BwdTile {
      static constexpr bool kSplitDkDv = kHeadDim > 128;
    };
    """
    assert aio.tile_shapes(256, header) == {"FwdTile": {"kWarps": 4, "kBlockM": 64, "kBlockN": 64},
                                          "BwdTile": {"kSplitDkDv": True}}
    real = aio.tile_shapes(128)  # the repository's header parses, for both element sizes
    assert real["FwdTile"]["kBlockM"] > 0 and real["BwdTile"]["kDkvBlockN"] > 0
    assert aio.tile_shapes(128, elem_bytes=4)["BwdTile"]["kDqBlockN"] > 0
    assert aio.simt_rows_per_cta() > 0
    assert aio.head_dim_bucket("bf16", 80) == 96 and aio.head_dim_bucket("fp32", 80) == 128


FWD = "void cuflash::flash_fwd_kernel<__nv_bfloat16, 64>(cuflash::FlashFwdParams)"
DELTA = "void cuflash::flash_bwd_delta_kernel<__nv_bfloat16, float>(cuflash::FlashBwdParams)"
DQ = "void cuflash::flash_bwd_dq_kernel<__nv_bfloat16, 64>(cuflash::FlashBwdParams)"
DKDV = "void cuflash::flash_bwd_dkdv_kernel<__nv_bfloat16, 64, true, true>(cuflash::FlashBwdParams)"
HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
          '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def details_rows(kid, name, read, write, unit="byte"):
    head = (f'"{kid}","4242","python3","127.0.0.1","{name}","1","7","(128, 1, 1)","(32, 32, 8)","0",'
            f'"9.0","Command line profiler metrics"')
    return [f'{head},"dram__bytes_read.sum","{unit}","{read}"',
            f'{head},"dram__bytes_write.sum","{unit}","{write}"']


def test_parse_ncu_details_csv():
    text = "\n".join([
        "==PROF== Connected to process 4242 (/usr/bin/python3.12)",
        "driver: bf16-D64-N2048 done",
        "==PROF== Profiling \"flash_fwd_kernel\" - 0: 0%....50%....100% - 1 pass",
        HEADER,
        *details_rows(0, FWD, "271,581,184", "68,157,440"),
        *details_rows(1, DELTA, "134.22", "1.05", unit="Mbyte"),
        *details_rows(2, DQ, "1,024.50", "n/a", unit="Kbyte"),
        "==WARNING== something ncu says at the end",
    ])
    kernels = aio.parse_ncu_csv(text)
    assert [k["id"] for k in kernels] == [0, 1, 2]
    assert kernels[0]["kernel"] == FWD and kernels[0]["grid"] == "(32, 32, 8)"
    assert kernels[0]["dram__bytes_read.sum"] == 271581184
    assert kernels[1]["dram__bytes_write.sum"] == pytest.approx(1.05e6)
    assert kernels[2]["dram__bytes_read.sum"] == pytest.approx(1024500)
    assert kernels[2]["dram__bytes_write.sum"] is None


def test_parse_ncu_raw_csv():
    text = "\n".join([
        '"ID","Process ID","Process Name","Host Name","Kernel Name","dram__bytes_read.sum","dram__bytes_write.sum"',
        '"","","","","","Mbyte","Kbyte"',
        f'"0","1","python3","h","{FWD}","2.5","512"',
    ])
    (k,) = aio.parse_ncu_csv(text)
    assert k["dram__bytes_read.sum"] == 2.5e6 and k["dram__bytes_write.sum"] == 512e3
    with pytest.raises(ValueError):
        aio.parse_ncu_csv("==ERROR== the profiler could not start")


def test_attribution_by_order_and_by_nvtx():
    configs = [cfg(2048, 64), cfg(2048, 64, causal=True)]
    names = [FWD, DELTA, DQ, DKDV] * 2
    kernels = [{"id": i, "kernel": n, "dram__bytes_read.sum": 1.0} for i, n in enumerate(names)]
    groups, how = aio.attribute(kernels, configs)
    assert how == "order"
    keys = [aio.config_key(c) for c in configs]
    assert [len(groups[k]["fwd"]) for k in keys] == [1, 1]
    assert [k["id"] for k in groups[keys[1]]["bwd"]] == [5, 6, 7]
    # NVTX names win when every kernel has one (here: the second config ran first).
    nvtx = {i: f"{aio.NVTX_TAG}[{keys[1 - i // 4]}/{'fwd' if i % 4 == 0 else 'bwd'}]" for i in range(8)}
    groups, how = aio.attribute(kernels, configs, nvtx)
    assert how == "nvtx" and [k["id"] for k in groups[keys[0]]["bwd"]] == [5, 6, 7]
    with pytest.raises(ValueError):
        aio.attribute(kernels[:4], configs)  # one group for two configs


def test_model_table_runs_without_a_gpu(capsys):
    assert aio.main(["--head-dims", "64", "--seqlens", "1024", "--causal", "false"]) == 0
    out = capsys.readouterr().out
    assert "| 64 | no | 1024 | 16 x 32 | fwd |" in out and "flash_bwd_dkdv_kernel" in out
