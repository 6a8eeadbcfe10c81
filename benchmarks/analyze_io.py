#!/usr/bin/env python3
"""The FlashAttention paper's IO analysis, for our kernels, against the DRAM traffic measured.

For each configuration, bytes moved through device memory by:
  standard  attention that stores S and P (the paper's Algorithms 0 and 3: S, P, dP, dS are
            N x N and go through HBM), element size of the input dtype
  min       every input read once, every output written once (a floor, not a kernel)
  tiled     our kernels, counting every global load and store as an HBM access: K and V are
            read once per query block (forward, dQ kernel), Q, dO, lse, delta once per key
            block (dK/dV kernel); tile sizes are parsed from csrc/cuda/tile_shapes.h
  measured  (--measure, on a GPU with Nsight Compute) dram__bytes_read.sum and
            dram__bytes_write.sum, caches flushed before each kernel

    python3 benchmarks/analyze_io.py                    # the model table (no GPU needed)
    python3 benchmarks/analyze_io.py --measure          # + ncu: <gpu>-<date>-io.{md,json}
"""
import argparse
import csv
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
TILE_SHAPES_H = REPO_ROOT / "csrc" / "cuda" / "tile_shapes.h"
SIMT_KERNEL_CUH = REPO_ROOT / "csrc" / "cuda" / "flash_simt_kernel.cuh"
GENERATE_KERNELS = REPO_ROOT / "tools" / "generate_kernels.py"

TOTAL_TOKENS, HIDDEN = 16384, 2048  # PERF.md's standard table
HEAD_DIMS, SEQLENS = (64, 128), (2048, 8192)
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
STATS_BYTES = {"bf16": 4, "fp16": 4, "fp32": 4, "fp64": 8}  # lse and delta
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")
NVTX_TAG = "cuflash_io"

# ---------------------------------------------------------------------------------------------
# Tile shapes, read from the C++ headers (the one source of truth).


TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_]\w*(?:::\w+)*)|(<=|>=|==|!=|&&|\|\||[-+*/%<>?:()!]))")


def _tokens(expr):
    pos, out = 0, []
    expr = expr.strip()
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot tokenize {expr[pos:]!r}")
        num, name, op = m.groups()
        out.append(("num", int(num)) if num else ("name", name) if name else ("op", op))
        pos = m.end()
    return out


def eval_cpp_expr(expr, names):
    """Evaluates the integer/bool C++ subset that tile_shapes.h uses: literals, names, unary
    ! and -, * / % + -, comparisons, && ||, and ?: (right-associative)."""
    toks, i = _tokens(expr), 0

    def peek():
        return toks[i][1] if i < len(toks) and toks[i][0] == "op" else None

    def take(op=None):
        nonlocal i
        if op is not None and peek() != op:
            raise ValueError(f"expected {op!r} in {expr!r}")
        i += 1
        return toks[i - 1]

    def binary(next_level, ops):
        def level():
            left = next_level()
            while peek() in ops:
                op = take()[1]
                right = next_level()
                left = ops[op](left, right)
            return left
        return level

    def cdiv(a, b):
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q

    def primary():
        if peek() == "(":
            take("(")
            v = ternary()
            take(")")
            return v
        if peek() in ("!", "-"):
            op = take()[1]
            v = primary()
            return (not v) if op == "!" else -v
        if i >= len(toks):
            raise ValueError(f"unexpected end of {expr!r}")
        kind, val = take()
        if kind == "num":
            return val
        if kind == "name" and val in ("true", "false"):
            return val == "true"
        if kind == "name" and val in names:
            return names[val]
        raise ValueError(f"unknown name {val!r} in {expr!r}")

    mul = binary(primary, {"*": lambda a, b: a * b, "/": cdiv, "%": lambda a, b: a % b})
    add = binary(mul, {"+": lambda a, b: a + b, "-": lambda a, b: a - b})
    rel = binary(add, {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
                       ">": lambda a, b: a > b, ">=": lambda a, b: a >= b})
    eq = binary(rel, {"==": lambda a, b: a == b, "!=": lambda a, b: a != b})
    land = binary(eq, {"&&": lambda a, b: bool(a and b)})
    lor = binary(land, {"||": lambda a, b: bool(a or b)})

    def ternary():
        cond = lor()
        if peek() != "?":
            return cond
        take("?")
        yes = ternary()
        take(":")
        no = ternary()
        return yes if cond else no

    value = ternary()
    if i != len(toks):
        raise ValueError(f"trailing tokens in {expr!r}")
    return value


def _strip_comments(text):
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def parse_tile_structs(text):
    """{struct name: [(member, expression), ...]} of `template <int kHeadDim[, int kElemBytes]>
    struct X {...}`."""
    text = _strip_comments(text)
    structs = {}
    for m in re.finditer(r"template\s*<\s*int\s+kHeadDim\s*(?:,\s*int\s+kElemBytes\s*)?>\s*struct\s+(\w+)\s*\{(.*?)\n\s*\};",
                         text, re.S):
        members = re.findall(r"static\s+constexpr\s+(?:int|bool)\s+(\w+)\s*=\s*([^;]+);", m.group(2))
        structs[m.group(1)] = [(name, " ".join(expr.split())) for name, expr in members]
    return structs


def tile_shapes(head_dim_bucket, text=None, elem_bytes=2):
    """{"FwdTile": {"kBlockM": 64, ...}, "BwdTile": {...}} for one head-dim bucket and element
    size (2: float16/bfloat16, 4: float32's 3xTF32 tiles): the tiles this model counts (the
    header's other structs, split-KV's tile, are not evaluated)."""
    text = TILE_SHAPES_H.read_text() if text is None else text
    structs = parse_tile_structs(text)
    for needed in ("FwdTile", "BwdTile"):
        if needed not in structs:
            raise ValueError(f"{TILE_SHAPES_H}: struct {needed} not found; update benchmarks/analyze_io.py")
    out = {}
    for struct in ("FwdTile", "BwdTile"):
        members = structs[struct]
        names = {"kHeadDim": head_dim_bucket, "kElemBytes": elem_bytes}
        for name, expr in members:
            try:
                names[name] = eval_cpp_expr(expr, names)
            except ValueError as e:
                raise ValueError(f"{TILE_SHAPES_H}: {struct}::{name}: {e}; update "
                                 "benchmarks/analyze_io.py's evaluator") from None
        del names["kHeadDim"], names["kElemBytes"]
        out[struct] = names
    return out


def simt_rows_per_cta(text=None):
    """The exact (fp64; fp32 under CUFLASH_FP32=exact) kernels: one warp per row, simt::kWarps rows
    per CTA."""
    text = _strip_comments(SIMT_KERNEL_CUH.read_text() if text is None else text)
    m = re.search(r"namespace\s+simt\s*\{.*?constexpr\s+int\s+kWarps\s*=\s*(\d+)\s*;", text, re.S)
    if not m:
        raise ValueError(f"{SIMT_KERNEL_CUH}: simt::kWarps not found; update benchmarks/analyze_io.py")
    return int(m.group(1))


def head_dim_bucket(dtype, head_dim):
    """The compiled bucket for (dtype, head_dim), from tools/generate_kernels.py's lists."""
    text = GENERATE_KERNELS.read_text()
    lists = dict(re.findall(r"^(\w+_HEAD_DIMS)\s*=\s*(\[[\d,\s]+\])", text, re.M))
    m = re.search(rf'"{dtype}":\s*\([^)]*?(\w+_HEAD_DIMS)\)', text)
    if not m or m.group(1) not in lists:
        raise ValueError(f"{GENERATE_KERNELS}: no head-dim list for {dtype}")
    for bucket in json.loads(lists[m.group(1)]):
        if head_dim <= bucket:
            return bucket
    raise ValueError(f"head_dim {head_dim} is above every {dtype} bucket")


# ---------------------------------------------------------------------------------------------
# The models. Byte counts for all batch * heads; {"read": r, "write": w}.


def _rw(read=0, write=0):
    return {"read": int(read), "write": int(write)}


def _add(*parts):
    return _rw(sum(p["read"] for p in parts), sum(p["write"] for p in parts))


def key_blocks_for_queries(m_start, block_m, seqlen_q, seqlen_k, block_n, causal):
    """csrc/cuda/mask.cuh, top-left causal (offset 0)."""
    n_end = seqlen_k
    if causal:
        n_end = min(n_end, min(m_start + block_m, seqlen_q))
    return -(-n_end // block_n) if n_end > 0 else 0


def stream_keys(seqlen_q, seqlen_k, block_m, block_n, causal):
    """Queries resident, keys streamed (forward, dQ): (query rows loaded, key rows loaded),
    summed over the query blocks."""
    q_rows = kv_rows = 0
    for m_start in range(0, seqlen_q, block_m):
        n_blocks = key_blocks_for_queries(m_start, block_m, seqlen_q, seqlen_k, block_n, causal)
        if n_blocks:
            q_rows += min(block_m, seqlen_q - m_start)
            kv_rows += min(seqlen_k, n_blocks * block_n)
    return q_rows, kv_rows


def stream_queries(seqlen_q, seqlen_k, block_m, block_n, causal):
    """Keys resident, queries streamed (dK/dV): (key rows loaded, query rows loaded), summed
    over the key blocks (mask.cuh's first_query_block_for_keys)."""
    k_rows = q_rows = 0
    for n_start in range(0, seqlen_k, block_n):
        first_m = (n_start // block_m) * block_m if causal else 0
        if first_m < seqlen_q:
            k_rows += min(block_n, seqlen_k - n_start)
            q_rows += seqlen_q - first_m
    return k_rows, q_rows


def standard_model(cfg):
    """Dao et al. 2022, Algorithm 0 (forward) and Algorithm 3 (backward): S, P (and dP, dS)
    written to and read from HBM, full N x N even when causal."""
    bh, nq, nk, d, e = cfg["batch"] * cfg["heads"], cfg["seqlen_q"], cfg["seqlen_k"], cfg["head_dim"], \
        ELEM_BYTES[cfg["dtype"]]
    mat, q, kv = nq * nk, nq * d, nk * d
    fwd = _rw(read=q + kv + mat + mat + kv,       # Q, K -> S; S -> P; P, V -> O
              write=mat + mat + q)                # S, P, O
    bwd = _rw(read=(mat + q) + (q + kv) + 2 * mat + (mat + kv) + (mat + q),
              # P, dO -> dV; dO, V -> dP; P, dP -> dS; dS, K -> dQ; dS, Q -> dK
              write=kv + mat + mat + q + kv)      # dV, dP, dS, dQ, dK
    scale = bh * e
    return {"fwd": _rw(fwd["read"] * scale, fwd["write"] * scale),
            "bwd": _rw(bwd["read"] * scale, bwd["write"] * scale)}


def min_model(cfg):
    """Each input read once, each output written once."""
    bh, nq, nk, d = cfg["batch"] * cfg["heads"], cfg["seqlen_q"], cfg["seqlen_k"], cfg["head_dim"]
    e, s = ELEM_BYTES[cfg["dtype"]], STATS_BYTES[cfg["dtype"]]
    fwd = _rw(read=(nq + 2 * nk) * d * e, write=nq * d * e + nq * s)          # q k v -> out lse
    bwd = _rw(read=(3 * nq + 2 * nk) * d * e + nq * s, write=(nq + 2 * nk) * d * e)  # q k v out dout lse -> dq dk dv
    return {"fwd": _rw(fwd["read"] * bh, fwd["write"] * bh), "bwd": _rw(bwd["read"] * bh, bwd["write"] * bh)}


def tiled_kernels(cfg, dlse=False):
    """Our launches, in order, each {"phase", "kernel", "read", "write"}, with the tile sizes
    they use. dlse: the backward was given a gradient of lse (autograd passes zeros)."""
    dtype, nq, nk, d = cfg["dtype"], cfg["seqlen_q"], cfg["seqlen_k"], cfg["head_dim"]
    bh, e, s = cfg["batch"] * cfg["heads"], ELEM_BYTES[dtype], STATS_BYTES[dtype]
    row, causal = d * e, cfg["causal"]
    if dtype == "fp64":
        r = simt_rows_per_cta()  # CTA of r warps = r rows; its warps' loads of one row meet in L1
        tiles = {"fwd": (r, 1), "dq": (r, 1), "dkdv": (1, r), "split": False}
        suffix = "_simt"
    else:
        t = tile_shapes(head_dim_bucket(dtype, d), elem_bytes=e)
        f, b = t["FwdTile"], t["BwdTile"]
        tiles = {"fwd": (f["kBlockM"], f["kBlockN"]), "dq": (b["kDqBlockM"], b["kDqBlockN"]),
                 "dkdv": (b["kDkvBlockM"], b["kDkvBlockN"]), "split": bool(b["kSplitDkDv"])}
        suffix = ""
    launches = []

    def launch(phase, kernel, read, write, tile=None):
        launches.append({"phase": phase, "kernel": kernel, "tile": tile,
                         "read": int(read * bh), "write": int(write * bh)})

    q_rows, kv_rows = stream_keys(nq, nk, *tiles["fwd"], causal)
    launch("fwd", f"flash_fwd{suffix}_kernel", q_rows * row + 2 * kv_rows * row, nq * row + nq * s,
           tiles["fwd"])
    launch("bwd", "flash_bwd_delta_kernel", 2 * nq * row + (nq * s if dlse else 0), nq * s)
    q_rows, kv_rows = stream_keys(nq, nk, *tiles["dq"], causal)
    launch("bwd", f"flash_bwd_dq{suffix}_kernel", 2 * q_rows * row + 2 * nq * s + 2 * kv_rows * row,
           nq * row, tiles["dq"])
    k_rows, q_rows = stream_queries(nq, nk, *tiles["dkdv"], causal)
    streamed = q_rows * (2 * row + 2 * s)  # Q, dO, lse, delta per key block
    if tiles["split"]:  # dK launch reads K and V; dV launch reads K only
        launch("bwd", f"flash_bwd_dkdv{suffix}_kernel", 2 * k_rows * row + streamed, nk * row, tiles["dkdv"])
        launch("bwd", f"flash_bwd_dkdv{suffix}_kernel", k_rows * row + streamed, nk * row, tiles["dkdv"])
    else:
        launch("bwd", f"flash_bwd_dkdv{suffix}_kernel", 2 * k_rows * row + streamed, 2 * nk * row, tiles["dkdv"])
    return launches, tiles


def tiled_model(cfg, dlse=False):
    launches, _ = tiled_kernels(cfg, dlse)
    return {phase: _add(*[k for k in launches if k["phase"] == phase]) for phase in ("fwd", "bwd")}


def configurations(dtype, head_dims, seqlens, causals, tokens=TOTAL_TOKENS, hidden=HIDDEN):
    return [{"dtype": dtype, "batch": max(1, tokens // n), "heads": hidden // d, "seqlen_q": n,
             "seqlen_k": n, "head_dim": d, "causal": c}
            for d in head_dims for n in seqlens for c in causals]


def config_key(cfg):
    return (f"{cfg['dtype']}-D{cfg['head_dim']}-N{cfg['seqlen_q']}-B{cfg['batch']}-H{cfg['heads']}"
            f"-{'causal' if cfg['causal'] else 'full'}")


# ---------------------------------------------------------------------------------------------
# Nsight Compute's CSV.

UNIT_BYTES = {"": 1, "byte": 1, "bytes": 1, "b": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9,
              "tbyte": 1e12, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10,
              "mib": 2**20, "gib": 2**30}


def parse_number(text):
    """'1,234,567.5' -> 1234567.5; '', 'n/a' -> None."""
    text = text.strip().replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def to_bytes(value, unit):
    scale = UNIT_BYTES.get(unit.strip().lower())
    if scale is None:
        raise ValueError(f"unknown byte unit {unit!r}")
    return None if value is None else value * scale


def parse_ncu_csv(text, metrics=METRICS):
    """Kernels of an `ncu --csv` report, in ID order: [{"id", "kernel", "grid", "block",
    metric: bytes, ...}]. Skips ==PROF== lines and program output before the header; reads
    both the details page (one row per metric: "Metric Name", "Metric Unit", "Metric Value")
    and the raw page (one column per metric, a units row under the header)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines)
                  if line.startswith('"ID"') and '"Kernel Name"' in line), None)
    if start is None:
        raise ValueError("no ncu CSV header (\"ID\",...,\"Kernel Name\",...) in the output")
    body = [line for line in lines[start:] if line.strip() and not line.startswith("==")]
    rows = list(csv.reader(io.StringIO("\n".join(body))))
    header, rows = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
    col = {name: i for i, name in enumerate(header)}
    kernels = {}

    def kernel(r):
        kid = int(r[col["ID"]])
        return kernels.setdefault(kid, {"id": kid, "kernel": r[col["Kernel Name"]],
                                        "grid": r[col["Grid Size"]] if "Grid Size" in col else "",
                                        "block": r[col["Block Size"]] if "Block Size" in col else ""})

    if "Metric Name" in col:
        for r in rows:
            name = r[col["Metric Name"]]
            if name in metrics and r[col["ID"]].strip():
                kernel(r)[name] = to_bytes(parse_number(r[col["Metric Value"]]), r[col["Metric Unit"]])
    else:
        units = {}
        if rows and not rows[0][col["ID"]].strip():  # the raw page's units row
            units, rows = dict(zip(header, rows[0])), rows[1:]
        missing = [m for m in metrics if m not in col]
        if missing:
            raise ValueError(f"ncu CSV has no column for {missing}")
        for r in rows:
            k = kernel(r)
            for m in metrics:
                k[m] = to_bytes(parse_number(r[col[m]]), units.get(m, "byte"))
    return [kernels[k] for k in sorted(kernels)]


KERNEL_ROLE = re.compile(r"flash_(fwd|bwd_delta|bwd_dq|bwd_dkdv)(?:_simt)?_kernel")
NVTX_RANGE = re.compile(rf"{NVTX_TAG}\[([^\]/]+)/(fwd|bwd)\]")


def attribute(kernels, configs, nvtx_names=None):
    """{config key: {"fwd": [kernel, ...], "bwd": [...]}}. By the NVTX range each kernel ran in
    (nvtx_names: id -> renamed kernel name) where every kernel has one; otherwise by order: the
    driver runs, per config in order, the forward op then the backward op, so a forward kernel
    that follows a backward one starts the next config."""
    keys = [config_key(c) for c in configs]
    out = {k: {"fwd": [], "bwd": []} for k in keys}
    ours = [k for k in kernels if KERNEL_ROLE.search(k["kernel"])]
    ranges = {}
    for k in ours:
        m = NVTX_RANGE.search((nvtx_names or {}).get(k["id"], ""))
        if m and m.group(1) in out:
            ranges[k["id"]] = (m.group(1), m.group(2))
    if ours and len(ranges) == len(ours):
        for k in ours:
            key, phase = ranges[k["id"]]
            out[key][phase].append(k)
        return out, "nvtx"
    index, prev_phase = -1, "bwd"
    for k in ours:
        phase = "fwd" if KERNEL_ROLE.search(k["kernel"]).group(1) == "fwd" else "bwd"
        if phase == "fwd" and prev_phase == "bwd":
            index += 1
        if index >= len(keys):
            raise ValueError(f"more kernel groups in the ncu report than the {len(keys)} configs run")
        out[keys[index]][phase].append(k)
        prev_phase = phase
    if index != len(keys) - 1:
        raise ValueError(f"{index + 1} kernel groups in the ncu report for {len(keys)} configs")
    return out, "order"


# ---------------------------------------------------------------------------------------------
# The driver (run under ncu) and the measurement.


def driver(args):
    """Runs, per config, our forward op once and our backward op once, each in an NVTX range."""
    import torch
    from bench_attention import environment, import_cuflash_attn
    import_cuflash_attn()
    ops = torch.ops.cuflash_attn
    configs = json.loads(Path(args.driver).read_text())
    props = torch.cuda.get_device_properties(0)
    env = {**environment(), "l2_bytes": getattr(props, "L2_cache_size", None),
           "sms": props.multi_processor_count}
    for cfg in configs:
        dtype = getattr(torch, TORCH_DTYPES[cfg["dtype"]])
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(cfg["batch"], cfg["heads"], n, cfg["head_dim"], device="cuda",
                                     dtype=dtype, generator=gen)
                         for n in (cfg["seqlen_q"], cfg["seqlen_k"], cfg["seqlen_k"], cfg["seqlen_q"]))
        key = config_key(cfg)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push(f"{NVTX_TAG}[{key}/fwd]")
        out, lse = ops.fwd(q, k, v, None, cfg["causal"], False)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        torch.cuda.nvtx.range_push(f"{NVTX_TAG}[{key}/bwd]")
        ops.bwd(dout, q, k, v, out, lse, None, None, cfg["causal"], False)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print(f"driver: {key} done", file=sys.stderr, flush=True)
        del q, k, v, dout, out, lse
        torch.cuda.empty_cache()
    Path(args.driver).with_suffix(".env.json").write_text(json.dumps(env))
    return 0


def find_ncu(explicit=None):
    if explicit:
        return explicit
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu"):
        hits = sorted(Path("/").glob(pattern.lstrip("/")))
        if hits:
            return str(hits[-1])
    return None


def run(cmd, timeout, what):
    """stdout of cmd; raises with the tail of its output if it fails."""
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for line in (proc.stdout + proc.stderr).splitlines():  # ncu's notes and warnings
        if line.startswith("==") and "Connected to process" not in line:
            print(line, file=sys.stderr)
    return proc.stdout


def measure(configs, ncu, timeout):
    """Profiles the driver under ncu; returns (env, {key: {"fwd": [...], "bwd": [...]}}, how)."""
    with tempfile.TemporaryDirectory(prefix="cuflash_io_") as tmp:
        cfg_path = Path(tmp) / "configs.json"
        cfg_path.write_text(json.dumps(configs))
        report = Path(tmp) / "io"
        # Caches flushed before each kernel (--cache-control all, the default, stated for the
        # reader); clocks left as they are (this workplace's rule for lent GPUs).
        run([ncu, "--clock-control", "none", "--cache-control", "all", "--nvtx",
             "--metrics", ",".join(METRICS), "--kernel-name-base", "demangled",
             "--kernel-name", "regex:flash_(fwd|bwd)", "-f", "-o", str(report),
             sys.executable, str(Path(__file__).resolve()), "--driver", str(cfg_path)], timeout, "ncu")
        rep = str(report) + ".ncu-rep"
        export = [ncu, "--import", rep, "--csv", "--page", "details", "--print-units", "base"]
        kernels = parse_ncu_csv(run(export, 120, "ncu --import"))
        try:
            renamed = parse_ncu_csv(run(export + ["--print-nvtx-rename", "kernel"], 120, "ncu --import (nvtx)"))
            nvtx_names = {k["id"]: k["kernel"] for k in renamed}
        except (RuntimeError, ValueError) as e:
            print(f"warning: no NVTX names ({str(e).splitlines()[0]}); attributing by order", file=sys.stderr)
            nvtx_names = None
        env = json.loads(cfg_path.with_suffix(".env.json").read_text())
        version = re.search(r"Version\s+(\S+)", run([ncu, "--version"], 60, "ncu --version"))
        env["ncu"] = f"ncu {version.group(1) if version else '(version unknown)'}"
    groups, how = attribute(kernels, configs, nvtx_names)
    return env, groups, how


# ---------------------------------------------------------------------------------------------
# Tables.


def gb(x):
    return "-" if x is None else f"{x / 1e9:.3g}"


def ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.3g}"


def analyze(configs, groups=None):
    """One record per config: the models per phase, and what was measured if groups is given."""
    records = []
    for cfg in configs:
        launches, tiles = tiled_kernels(cfg)
        rec = {**cfg, "tiles": tiles, "phases": {}, "kernels": launches}
        std, low, tiled = standard_model(cfg), min_model(cfg), tiled_model(cfg)
        for phase in ("fwd", "bwd"):
            p = {"standard": std[phase], "min": low[phase], "tiled": tiled[phase]}
            if groups is not None:
                measured = groups[config_key(cfg)][phase]
                p["measured"] = {
                    "read": sum(k.get(METRICS[0]) or 0 for k in measured),
                    "write": sum(k.get(METRICS[1]) or 0 for k in measured),
                    "kernels": [{"kernel": k["kernel"], "grid": k["grid"], "read": k.get(METRICS[0]),
                                 "write": k.get(METRICS[1])} for k in measured]}
            rec["phases"][phase] = p
        records.append(rec)
    return records


def total(rw):
    return rw["read"] + rw["write"]


def io_table(records):
    measured = any("measured" in p for r in records for p in r["phases"].values())
    head = ["D", "causal", "N", "B x H", "pass", "standard GB", "min GB", "tiled GB",
            "tiled / min", "standard / tiled"]
    if measured:
        head += ["measured read GB", "measured write GB", "measured / tiled", "measured / min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        for phase, p in r["phases"].items():
            std, low, tiled = total(p["standard"]), total(p["min"]), total(p["tiled"])
            cells = [str(r["head_dim"]), "yes" if r["causal"] else "no", str(r["seqlen_q"]),
                     f"{r['batch']} x {r['heads']}", phase, gb(std), gb(low), gb(tiled),
                     ratio(tiled, low), ratio(std, tiled)]
            if measured:
                m = p.get("measured")
                mt = total(m) if m else None
                cells += [gb(m and m["read"]), gb(m and m["write"]), ratio(mt, tiled), ratio(mt, low)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def kernel_table(records):
    head = ["D", "causal", "N", "kernel", "tile (M x N)", "tiled read GB", "tiled write GB",
            "measured read GB", "measured write GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        measured = [k for phase in ("fwd", "bwd") for k in r["phases"][phase].get("measured", {}).get("kernels", [])]
        for i, k in enumerate(r["kernels"]):
            m = measured[i] if i < len(measured) else {}
            tile = f"{k['tile'][0]} x {k['tile'][1]}" if k["tile"] else "-"
            lines.append("| " + " | ".join([str(r["head_dim"]), "yes" if r["causal"] else "no",
                                            str(r["seqlen_q"]), k["kernel"], tile, gb(k["read"]),
                                            gb(k["write"]), gb(m.get("read")), gb(m.get("write"))]) + " |")
    return "\n".join(lines) + "\n"


EXPLANATION = """\
- **standard**: attention that writes S = QK^T and P = softmax(S) to HBM and reads them back
  (the FlashAttention paper's Algorithm 0; backward, Algorithm 3, also stores dP and dS):
  forward reads Q, K, V, S, P and writes S, P, O; backward reads P, dO, V, dP, dS, K, Q and
  writes dV, dP, dS, dQ, dK. N x N elements at the input's element size, full even when causal.
- **min**: each input read once and each output written once (forward: q, k, v -> out, lse;
  backward: q, k, v, out, dout, lse -> dq, dk, dv). No kernel moves less.
- **tiled**: our kernels' global loads and stores, each counted as an HBM access (the paper's
  accounting, Theorem 2), with the tile sizes of `csrc/cuda/tile_shapes.h`: the forward reads
  Q once and K, V once per query block (ceil(N / BM) times; causal about half); the backward's
  delta kernel reads out and dout; the dQ kernel reads Q, dO, lse, delta once and K, V once per
  query block; the dK/dV kernel reads K, V once and Q, dO, lse, delta once per key block
  (above D = 128, dK and dV are two launches that both stream Q, dO, lse, delta).
  Per pass, standard / tiled is about 2 BM / D (S and P cost 4 N^2 elements, the K/V re-reads
  2 N D (N / BM)): with our 64-row query tiles the tiled count is below the standard one only
  for D < 128, and what makes the tiled kernels cheap in DRAM is the L2 (next line).
- **measured**: Nsight Compute's `dram__bytes_read.sum` and `dram__bytes_write.sum`, summed
  over our kernels of each pass, L2 flushed before each kernel. Far below **tiled**, near
  **min**: the CTAs of one (batch, head) run at the same time (blockIdx.x varies fastest) and
  their repeated K/V (or Q/dO) reads hit in L2 (50 MB on an H100; one head's K and V are
  2 N D bytes x 2, 0.5 MB at N = 2048, D = 64), so DRAM sees about one read of each. Measured
  above **min** means L2 misses on those re-reads (larger N, or heads evicting each other);
  writes still in L2 when a kernel ends may go uncounted. Through autograd the backward also
  reads a zero dlse (4 bytes per query row) that these direct op calls do not pass.
"""


def render_markdown(records, env=None, how=None):
    parts = ["# IO analysis: bytes through device memory\n"]
    if env:
        l2 = f", L2 {env['l2_bytes'] / 2**20:.0f} MiB" if env.get("l2_bytes") else ""
        parts.append(f"{env['gpu']}{l2}, torch {env['torch']}, CUDA {env['cuda']}, {env['date']}, "
                     f"commit {env['commit'][:12]}, {env.get('ncu', 'ncu')}; kernels attributed "
                     f"to passes by {how}.\n")
    else:
        parts.append("Model only (no measurement: run with --measure on a GPU with Nsight Compute).\n")
    parts.append("`benchmarks/analyze_io.py`. GB = 1e9 bytes; each pass once (fwd: our forward op; "
                 "bwd: our backward op), dtype " + ", ".join(sorted({r["dtype"] for r in records}))
                 + ", layout [B, H, N, D].\n")
    parts.append(io_table(records))
    parts.append(EXPLANATION)
    parts.append("## Per kernel\n\n" + kernel_table(records))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)), help="comma list (default 64,128)")
    p.add_argument("--seqlens", default=",".join(map(str, SEQLENS)), help="comma list (default 2048,8192)")
    p.add_argument("--causal", choices=("both", "true", "false"), default="both")
    p.add_argument("--dtype", choices=sorted(ELEM_BYTES), default="bf16")
    p.add_argument("--tokens", type=int, default=TOTAL_TOKENS,
                   help=f"batch = tokens // seqlen (default {TOTAL_TOKENS}, PERF.md's standard table)")
    p.add_argument("--measure", action="store_true",
                   help="profile our kernels with Nsight Compute (needs a GPU and ncu) and write "
                        "<gpu>-<date>-io.md/.json under --out")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output directory (default benchmarks/results)")
    p.add_argument("--ncu", default=None, help="path of ncu (default: on PATH, or under /usr/local/cuda)")
    p.add_argument("--timeout", type=int, default=300, help="seconds for the profiled run (default 300)")
    p.add_argument("--driver", default=None, help=argparse.SUPPRESS)  # internal: run under ncu
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.driver:
        return driver(args)
    causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    configs = configurations(args.dtype, [int(x) for x in args.head_dims.split(",") if x],
                             [int(x) for x in args.seqlens.split(",") if x], causals, args.tokens)
    if not args.measure:
        print(render_markdown(analyze(configs)))
        return 0
    ncu = find_ncu(args.ncu)
    if ncu is None:
        print("error: ncu (Nsight Compute) not found; pass --ncu PATH", file=sys.stderr)
        return 2
    env, groups, how = measure(configs, ncu, args.timeout)
    records = analyze(configs, groups)
    markdown = render_markdown(records, env, how)
    from bench_attention import slug
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{slug(env['gpu'])}-{env['date']}-io"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "attributed_by": how, "configs": records},
                                                    indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
