"""benchmarks/analyze_io.py: the IO models on hand-computed cases, the tile-shape parser, and the
Nsight Compute CSV parser on output written the way ncu 2025.x writes it. CPU only."""
import re
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
    launches = aio.tiled_kernels(c, "sm80")
    fwd = launches[0]
    bm, bn = fwd["tile"]
    assert fwd["kernel"] == "flash_fwd_kernel" and fwd["phase"] == "fwd"
    assert fwd["tile"] == (aio.tile_shapes(64)["FwdTile"]["kBlockM"], aio.tile_shapes(64)["FwdTile"]["kBlockN"])
    row = 64 * 2
    assert fwd["read"] == 4 * (1024 * row + -(-1024 // bm) * 1024 * 2 * row)
    assert fwd["write"] == 4 * (1024 * row + 1024 * 4)
    assert [k["kernel"] for k in launches[1:]] == ["flash_bwd_delta_kernel", "flash_bwd_dq_kernel",
                                                   "flash_bwd_dkdv_kernel"]
    # the tiled kernels never move less than the minimum, on either architecture
    low = aio.min_model(c)
    for arch in aio.ARCHS:
        tiled = aio.tiled_model(c, arch)
        for phase in ("fwd", "bwd"):
            assert tiled[phase]["read"] >= low[phase]["read"]
            assert tiled[phase]["write"] >= low[phase]["write"]


def test_split_dkdv_above_128():
    """The sm_80-class kernels split dK and dV above head dim 128; Hopper runs its fused head-dim-256
    kernel there (80 keys x 64 queries, flash_bwd_sm90_fused256.cuh), dQ added up."""
    dkdv = [k for k in aio.tiled_kernels(cfg(512, 256), "sm80") if k["kernel"].startswith("flash_bwd_dkdv")]
    assert [k["variant"] for k in dkdv] == ["dK", "dV"]
    assert dkdv[0]["read"] - dkdv[1]["read"] == 512 * 256 * 2  # V, once
    bwd = [(k["kernel"], k["tile"], k["variant"]) for k in aio.tiled_kernels(cfg(512, 256), "sm90")[1:]]
    assert bwd == [("flash_bwd_delta_kernel", bwd[0][1], ""), ("flash_bwd_fused_sm90_tma_kernel", (64, 80), "fused dQ"),
                   ("flash_bwd_dq_convert_kernel", bwd[2][1], "")], bwd


def test_hopper_forward_by_hand():
    # D = 64, 2048 keys a row without a mask: the wide TMA tile (three consumer warpgroups, 192
    # query rows, 128 keys a step; flash_fwd_sm90_tma.cuh), not tile_shapes.h's, persistent.
    c = cfg(2048, 64, batch=2, heads=3)
    fwd = aio.tiled_kernels(c, "sm90")[0]
    assert (fwd["kernel"], fwd["tile"], fwd["variant"]) == ("flash_fwd_sm90_tma_kernel", (192, 128), "wide, persistent")
    row, q_blocks = 64 * 2, -(-2048 // 192)
    assert fwd["read"] == 6 * (2048 * row + q_blocks * 2048 * 2 * row)
    # causal: the middle row sees 1025 keys: short rows, the narrow persistent kernel
    fwd = aio.tiled_kernels(cfg(2048, 64, causal=True), "sm90")[0]
    assert (fwd["tile"], fwd["variant"]) == ((128, 128), "narrow, persistent")
    # D = 128 takes the wide tile (192 keys a step, the 3-D grid) from 4096 keys a row only
    assert aio.tiled_kernels(cfg(2048, 128), "sm90")[0]["variant"] == "narrow, persistent"
    assert aio.tiled_kernels(cfg(4096, 128), "sm90")[0]["variant"] == "wide"
    assert aio.tiled_kernels(cfg(4096, 128, causal=True), "sm90")[0]["variant"] == "narrow"
    assert aio.tiled_kernels(cfg(4096, 64, causal=True), "sm90")[0]["variant"] == "wide"


def test_hopper_fused_backward_by_hand():
    # D = 64, N = 1024: the fused kernel, 128 keys resident, 128 queries a step (1024 keys a row).
    n, d = 1024, 64
    bwd = [k for k in aio.tiled_kernels(cfg(n, d), "sm90") if k["phase"] == "bwd"]
    assert [k["kernel"] for k in bwd] == ["flash_bwd_delta_kernel", "flash_bwd_dkdv_sm90_tma_kernel",
                                          "flash_bwd_dq_convert_kernel"]
    delta, dkdv, convert = bwd
    row, accum_row, key_blocks = d * 2, d * 4, n // 128
    assert dkdv["tile"] == (128, 128)
    assert delta["write"] == n * 4 + n * accum_row  # delta, and dq_accum zeroed
    # K, V once; Q, dO, lse, delta and a read of dq_accum per key block; dK, dV and dq_accum's
    # writes
    assert dkdv["read"] == 2 * n * row + key_blocks * n * (2 * row + 2 * 4 + accum_row)
    assert dkdv["write"] == 2 * n * row + key_blocks * n * accum_row
    assert (convert["read"], convert["write"]) == (n * accum_row, n * row)
    # D = 128 below 512 keys a row: the dQ kernel and the dK/dV kernel, no dq_accum; from 512 the
    # fused kernel
    assert [k["kernel"] for k in aio.tiled_kernels(cfg(256, 128), "sm90")[1:]] == [
        "flash_bwd_delta_kernel", "flash_bwd_dq_sm90_tma_kernel", "flash_bwd_dkdv_sm90_tma_kernel"]
    assert [k["kernel"] for k in aio.tiled_kernels(cfg(512, 128), "sm90")[1:]] == [
        "flash_bwd_delta_kernel", "flash_bwd_dkdv_sm90_tma_kernel", "flash_bwd_dq_convert_kernel"]
    # float32 and head dims without a Hopper kernel: the sm_80-class kernels on Hopper too
    for c in (cfg(512, 64, dtype="fp32"), cfg(512, 96)):
        assert aio.tiled_kernels(c, "sm90") == aio.tiled_kernels(c, "sm80")


def test_cpp_expression_evaluator():
    names = {"kHeadDim": 160, "kWarps": 4}
    assert aio.eval_cpp_expr("kHeadDim <= 64 ? 128 : kHeadDim <= 128 ? 64 : 32", names) == 32
    assert aio.eval_cpp_expr("16 * kWarps", names) == 64
    assert aio.eval_cpp_expr("kHeadDim > 128", names) is True
    assert aio.eval_cpp_expr("(kHeadDim + 31) / 32 * 32 - 1", names) == 159
    assert aio.eval_cpp_expr("!(kWarps == 4) || kHeadDim % 32 != 0", names) is False
    with pytest.raises(ValueError):
        aio.eval_cpp_expr("std::max(kHeadDim, 64)", names)
    rows = {"kStreamed": ("kHeadDim", "kHeadDim <= 128 ? 64 : 32")}
    assert aio.eval_cpp_expr("kWide ? 128 : kStreamed<kHeadDim>", {"kHeadDim": 256, "kWide": False}, rows) == 32


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


def test_kernel_struct_and_route_parsers(tmp_path):
    # Several declarators a statement, other template parameters, members left unread (a call).
    header = """
    template <int kHeadDim>
    constexpr int kRows = kHeadDim <= 128 ? 64 : 32;
    template <typename T, int kHeadDim, bool kWide = false>
    struct Kernel {
      static constexpr int kConsumers = kWide ? 3 : 2, kBlockM = 64 * kConsumers;
      static constexpr bool kFast = fast_enough(kHeadDim);
      static constexpr int kBlockN = kRows<kHeadDim>;
    };
    template <int kHeadDim>
    bool wide_rows(const FlashFwdParams& p) {
      return middle_row_keys(p) >= (kHeadDim == 128 ? 4096 : 2048);  // a comment; with a ;
    }
    """
    members = aio.parse_tile_structs(header)["Kernel"]
    assert members[:2] == [("kConsumers", "kWide ? 3 : 2"), ("kBlockM", "64 * kConsumers")]
    templates = aio.parse_variable_templates(header)
    values = aio.evaluate_members(members, {"kHeadDim": 256, "kWide": True}, "Kernel", ("kBlockM", "kBlockN"),
                                  templates)
    assert (values["kBlockM"], values["kBlockN"]) == (192, 32) and "kFast" not in values
    with pytest.raises(ValueError, match="kFast"):
        aio.evaluate_members(members, {"kHeadDim": 64, "kWide": False}, "Kernel", ("kFast",), templates)
    path = tmp_path / "route.cuh"
    path.write_text(header)
    assert aio.host_predicate(path, "wide_rows", {"middle_row_keys": 2048, "kHeadDim": 64})
    assert not aio.host_predicate(path, "wide_rows", {"middle_row_keys": 2048, "kHeadDim": 128})
    # the repository's Hopper headers parse
    tma = aio.sm90_constants(aio.SM90_FWD_TMA_CUH, "FwdSm90TmaKernel", ("kBlockM", "kBlockN"), kHeadDim=64,
                             kWide=True, kPersistent=False)
    assert tma == {"kBlockM": 192, "kBlockN": 128}


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


# Hopper's kernels as the H200 run of 2026-12-02 profiled them (the names the old role pattern
# missed: its forward measured 0 bytes).
SM90_FWD = ("void cuflash::sm90::flash_fwd_sm90_tma_kernel<__nv_bfloat16, (int)64, (bool)1, (bool)0, (bool)0>"
            "(cuflash::FlashFwdParams, CUtensorMap_st, CUtensorMap_st, CUtensorMap_st, CUtensorMap_st, "
            "cuflash::sm90::TileWalk)")
SM90_DELTA = "void cuflash::flash_bwd_delta_kernel<__nv_bfloat16, float, (int)8>(cuflash::FlashBwdParams)"
SM90_DKDV = ("void cuflash::sm90::flash_bwd_dkdv_sm90_tma_kernel<__nv_bfloat16, (int)64, (bool)1, (bool)1, "
             "(bool)1, (bool)1, (bool)1>(cuflash::FlashBwdParams, CUtensorMap_st, CUtensorMap_st, CUtensorMap_st, "
             "CUtensorMap_st, CUtensorMap_st, CUtensorMap_st, CUtensorMap_st)")
SM90_CONVERT = "void cuflash::flash_bwd_dq_convert_kernel<__nv_bfloat16, (int)8>(cuflash::FlashBwdParams)"
H200_IO_LOG = Path(__file__).resolve().parent.parent / "benchmarks/results/logs/nvidia-h200-2026-12-02-io.log"


def test_every_kernel_of_ours_has_a_role():
    for name in aio.source_kernel_names():  # csrc/cuda's __global__ kernels
        if name.startswith("flash_"):
            role = aio.classify_kernel(name)
            assert role and role["function"] == name, name
    roles = [aio.classify_kernel(n) for n in (SM90_FWD, SM90_DELTA, SM90_DKDV, SM90_CONVERT)]
    assert [(r["function"], r["phase"], r["family"]) for r in roles] == [
        ("flash_fwd_sm90_tma_kernel", "fwd", "sm90_tma"), ("flash_bwd_delta_kernel", "bwd", "any"),
        ("flash_bwd_dkdv_sm90_tma_kernel", "bwd", "sm90_tma"), ("flash_bwd_dq_convert_kernel", "bwd", "any")]
    assert aio.classify_kernel("void at::native::vectorized_elementwise_kernel<4>(int)") is None


def test_hopper_kernels_attributed_from_the_h200_log():
    # The run's 32 kernels, in its order: per config the forward, then delta, dK/dV/dQ, dq_convert.
    names = re.findall(r'^==PROF== Profiling "(.*)": ', H200_IO_LOG.read_text(), re.M)
    configs = aio.configurations("bf16", (64, 128), (2048, 8192), (False, True))
    assert len(names) == 4 * len(configs) and SM90_FWD in names and SM90_DKDV in names
    text = "\n".join([HEADER] + [r for i, n in enumerate(names) for r in details_rows(i, n, 1e6 * (i + 1), 1e5)])
    kernels = aio.parse_ncu_csv(text)
    nvtx = {i: f"{aio.NVTX_TAG}[{aio.config_key(configs[i // 4])}/{'fwd' if i % 4 == 0 else 'bwd'}]"
            for i in range(len(names))}
    for names_by in (None, nvtx):
        groups, how = aio.attribute(kernels, configs, names_by)
        assert how == ("order" if names_by is None else "nvtx")
        for i, c in enumerate(configs):
            g = groups[aio.config_key(c)]
            assert [k["id"] for k in g["fwd"]] == [4 * i]
            assert [k["id"] for k in g["bwd"]] == [4 * i + 1, 4 * i + 2, 4 * i + 3]
            assert [k["function"] for k in g["fwd"] + g["bwd"]] == [
                "flash_fwd_sm90_tma_kernel", "flash_bwd_delta_kernel", "flash_bwd_dkdv_sm90_tma_kernel",
                "flash_bwd_dq_convert_kernel"]
    # Every byte counts, and the Hopper model names the launches that ran on every row.
    assert aio.measured_arch(groups) == "sm90"
    records = aio.analyze(configs, groups, "sm90")
    for i, r in enumerate(records):
        fwd, bwd = r["phases"]["fwd"], r["phases"]["bwd"]
        assert fwd["measured"]["read"] == 1e6 * (4 * i + 1)
        assert bwd["measured"]["read"] == 1e6 * (3 * (4 * i + 1) + 6)
        assert fwd["measured"]["same_kernels"] and bwd["measured"]["same_kernels"], aio.config_key(r)
        assert fwd["path"] == bwd["measured"]["path"] == "sm90_tma"
    table = aio.io_table(records)
    assert "| flash_bwd_delta, flash_bwd_dkdv_sm90_tma, flash_bwd_dq_convert |" in table
    # The sm_80-class model beside these measurements: named as such, and no measured / tiled.
    row = next(line for line in aio.io_table(aio.analyze(configs, groups, "sm80")).splitlines()
               if line.startswith("| 64 | no | 2048 | 8 x 32 | fwd |"))
    assert "| sm80 |" in row and "| flash_fwd_sm90_tma |" in row and row.split(" | ")[-2] == "-"
    assert "not modeled" in aio.kernel_table(aio.analyze(configs, groups, "sm80"))


def test_unknown_kernel_of_ours_raises():
    configs = [cfg(2048, 64)]
    unknown = "void cuflash::sm100::flash_fwd_sm100_kernel<__nv_bfloat16, (int)64>(cuflash::FlashFwdParams)"
    kernels = [{"id": i, "kernel": n} for i, n in enumerate([unknown, SM90_DELTA, SM90_DKDV, SM90_CONVERT])]
    with pytest.raises(ValueError, match="flash_fwd_sm100_kernel.*no role"):
        aio.attribute(kernels, configs)
    with pytest.raises(ValueError, match="no role"):
        aio.classify_kernel("flash_bwd_dq_sm90_tma")  # not a kernel name: no _kernel


def test_model_table_runs_without_a_gpu(capsys):
    assert aio.main(["--head-dims", "64", "--seqlens", "1024", "--causal", "false"]) == 0
    out = capsys.readouterr().out
    assert "| 64 | no | 1024 | 16 x 32 | fwd | sm90_tma |" in out and "flash_bwd_dkdv_sm90_tma" in out
    assert aio.main(["--head-dims", "64", "--seqlens", "1024", "--causal", "false", "--arch", "sm80"]) == 0
    out = capsys.readouterr().out
    assert "| 64 | no | 1024 | 16 x 32 | bwd | sm80 |" in out and "| flash_bwd_dkdv |" in out
