#!/usr/bin/env python3
"""The FlashAttention paper's IO analysis, for our kernels, against the DRAM traffic measured.

For each configuration, bytes moved through device memory by:
  standard  attention that stores S and P (the paper's Algorithms 0 and 3: S, P, dP, dS are
            N x N and go through HBM), element size of the input dtype
  min       every input read once, every output written once (a floor, not a kernel)
  tiled     the kernels our ops launch on one GPU architecture (--arch; the `path` column says
            which kernels: sm80, the sm_80-class tensor-core kernels, simt, the exact ones, or
            sm90_tma, Hopper's warp-specialized ones, chosen as flash_launch.cuh chooses them with
            the default switches), counting every global load and store as an HBM access: K and
            V read once per query block (forward, dQ kernel), Q, dO, lse, delta once per key
            block (dK/dV kernel; on Hopper's fused backward with dQ added to an fp32 buffer by
            TMA reduce-add, a read and a write of it per key block); tile sizes and route rules
            parsed from the headers (csrc/cuda/tile_shapes.h, csrc/cuda/sm90/*.cuh, the choice
            functions)
  measured  (--measure, on a GPU with Nsight Compute) dram__bytes_read.sum and
            dram__bytes_write.sum summed over every one of our kernels of the pass, caches flushed
            before each kernel; measured / tiled only where the kernels measured are the ones
            modeled. Every kernel ncu profiles must be one whose role we know (KERNEL_NAME): an
            unknown one stops the run, as dropping Hopper's kernels silently once measured the
            forward at 0 bytes (2026-12-02, H200).

    python3 benchmarks/analyze_io.py                    # the model table (no GPU needed)
    python3 benchmarks/analyze_io.py --arch sm80        # the sm_80-class kernels' model
    python3 benchmarks/analyze_io.py --measure          # + ncu: <gpu>-<date>-io.{md,json}
"""
import argparse
import csv
import functools
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
CUDA_DIR = REPO_ROOT / "csrc" / "cuda"
TILE_SHAPES_H = CUDA_DIR / "tile_shapes.h"
SIMT_KERNEL_CUH = CUDA_DIR / "flash_simt_kernel.cuh"
FLASH_LAUNCH_CUH = CUDA_DIR / "flash_launch.cuh"
BACKWARD_CHOICE_CU = CUDA_DIR / "backward_choice.cu"
SM90_FWD_CUH = CUDA_DIR / "sm90" / "flash_fwd_sm90.cuh"
SM90_FWD_TMA_CUH = CUDA_DIR / "sm90" / "flash_fwd_sm90_tma.cuh"
SM90_BWD_CUH = CUDA_DIR / "sm90" / "flash_bwd_sm90.cuh"
SM90_BWD_TMA_CUH = CUDA_DIR / "sm90" / "flash_bwd_sm90_tma.cuh"
SM90_BWD_FUSED256_CUH = CUDA_DIR / "sm90" / "flash_bwd_sm90_fused256.cuh"
GENERATE_KERNELS = REPO_ROOT / "tools" / "generate_kernels.py"

TOTAL_TOKENS, HIDDEN = 16384, 2048  # PERF.md's standard table
HEAD_DIMS, SEQLENS = (64, 128), (2048, 8192)
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
STATS_BYTES = {"bf16": 4, "fp16": 4, "fp32": 4, "fp64": 8}  # lse and delta
ACCUM_BYTES = 4  # dq_accum, the fused backward's fp32 dQ
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


def _expand_variable_templates(expr, names, templates):
    """`kBwdStreamedRows<kHeadDim>` -> its value, for templates {name: (parameter, expression)}
    (`template <int P> constexpr int name = expression;`): the tokenizer would read the angle
    brackets as comparisons."""
    if not templates:
        return expr
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, templates)) + r")\s*<([^<>]*)>")

    def value(m):
        param, body = templates[m.group(1)]
        v = eval_cpp_expr(body, {param: eval_cpp_expr(m.group(2), names, templates)}, templates)
        return f"({str(v).lower() if isinstance(v, bool) else v})"
    return pattern.sub(value, expr)


def eval_cpp_expr(expr, names, templates=None):
    """Evaluates the integer/bool C++ subset that the tile structs use: literals, names, unary
    ! and -, * / % + -, comparisons, && ||, ?: (right-associative), and one-int-parameter
    variable templates (templates: see _expand_variable_templates)."""
    expr = _expand_variable_templates(expr, names, templates)
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


@functools.lru_cache(maxsize=None)
def _source(path):
    return _strip_comments(Path(path).read_text())


def _split_top_level(text, sep=","):
    """text split at `sep` outside parentheses: `int a = f(x, y), b = 2` declares a and b."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def parse_tile_structs(text):
    """{struct name: [(member, expression), ...]} of every `template <...> struct X {...}`'s
    `static constexpr int|bool` members (several declarators to a statement allowed)."""
    text = _strip_comments(text)
    structs = {}
    for m in re.finditer(r"template\s*<[^<>]*>\s*struct\s+(\w+)\s*\{(.*?)\n\s*\};", text, re.S):
        members = []
        for decl in re.findall(r"static\s+constexpr\s+(?:int|bool)\s+([^;]+);", m.group(2)):
            for part in _split_top_level(decl):
                name, _, expr = part.partition("=")
                members.append((name.strip(), " ".join(expr.split())))
        structs[m.group(1)] = members
    return structs


def parse_variable_templates(text):
    """{name: (parameter, expression)} of `template <int P> constexpr int|bool name = expr;`."""
    return {name: (param, " ".join(expr.split())) for param, name, expr in re.findall(
        r"template\s*<\s*int\s+(\w+)\s*>\s*constexpr\s+(?:int|bool)\s+(\w+)\s*=\s*([^;]+);",
        _strip_comments(text))}


def evaluate_members(members, names, where, wanted=None, templates=None):
    """The members' values, in order, given the template arguments `names`. A member the
    evaluator cannot read (a function call, say) is left out unless it is `wanted` (None: every
    member), where it raises."""
    values, errors = dict(names), {}
    for name, expr in members:
        try:
            values[name] = eval_cpp_expr(expr, values, templates)
        except ValueError as e:
            errors[name] = e
    for name in (wanted if wanted is not None else [n for n, _ in members]):
        if name not in values:
            why = errors.get(name, "not a static constexpr member")
            raise ValueError(f"{where}::{name}: {why}; update benchmarks/analyze_io.py's evaluator")
    return {name: values[name] for name, _ in members if name in values}


def tile_shapes(head_dim_bucket, text=None, elem_bytes=2, pairs=False):
    """{"FwdTile": {"kBlockM": 64, ...}, "BwdTile": {...}} for one head-dim bucket and element
    size (2: float16/bfloat16, 4: float32's 3xTF32 tiles, or with pairs its fp16 pairs' tiles):
    the sm_80-class kernels' tiles that this model counts (the header's other structs, split-KV's
    tile, are not evaluated)."""
    text = TILE_SHAPES_H.read_text() if text is None else text
    structs = parse_tile_structs(text)
    out = {}
    for struct in ("FwdTile", "BwdTile"):
        if struct not in structs:
            raise ValueError(f"{TILE_SHAPES_H}: struct {struct} not found; update benchmarks/analyze_io.py")
        out[struct] = evaluate_members(structs[struct],
                                       {"kHeadDim": head_dim_bucket, "kElemBytes": elem_bytes, "kPairs": pairs},
                                       f"{TILE_SHAPES_H}: {struct}")
    return out


def sm90_variable_templates():
    """kFwdHeadDim, kBwdHeadDim, kBwdStreamedRows, ... of the Hopper headers."""
    return {**parse_variable_templates(_source(SM90_FWD_CUH)), **parse_variable_templates(_source(SM90_BWD_CUH))}


def sm90_constants(path, struct, wanted, **template_args):
    """Members `wanted` of the Hopper kernel struct `struct` in `path` for the template
    arguments given (bools and ints by the header's parameter names; T, the element type, is
    not read)."""
    structs = parse_tile_structs(_source(path))
    if struct not in structs:
        raise ValueError(f"{path}: struct {struct} not found; update benchmarks/analyze_io.py")
    values = evaluate_members(structs[struct], template_args, f"{path}: {struct}", wanted,
                              sm90_variable_templates())
    return {name: values[name] for name in wanted}


# The host-side route rules (flash_launch.cuh, backward_choice.cu, flash_fwd_sm90_tma.cuh) are
# evaluated from their source: a predicate's last `return` expression, its terms of p renamed
# to the values a configuration gives them.
HOST_TERMS = {r"(?:sm90::)?middle_row_keys\(p\)": "middle_row_keys",
              r"cuda_head_dim_bucket\(p\.dtype,\s*p\.shape\.head_dim\)": "bucket",
              r"p\.shape\.seqlen_q": "seqlen_q", r"p\.mask\.window_left": "window_left",
              r"p\.mask\.window_right": "window_right", r"(?:sm90::)?unmasked\(p\)": "unmasked",
              r"(?:sm90::)?banded\(p\)": "banded",
              r"(?:sm90::)?balanced_tiles\(p,\s*banded_walks\)": "balanced_tiles",
              r"(?:sm90::)?long_rows\(p\)": "long_rows",
              r"(?:sm90::)?wide_rows<kHeadDim>\(p\)": "wide_rows",
              r"(?:sm90::)?persistent_wide_pays\(p\)": "persistent_wide_pays",
              r"needs_feature_path\(p\)": "features"}


def host_predicate(path, function, values):
    """The value of `bool function(...)`'s last return expression in `path` (a body without
    nested braces) for `values` (HOST_TERMS' names, kHeadDim, locals such as bucket)."""
    m = re.search(rf"\bbool\s+{function}\s*\([^)]*\)\s*\{{([^{{}}]*)\}}", _source(path))
    returns = re.findall(r"return\s+([^;]+);", m.group(1)) if m else []
    if not returns:
        raise ValueError(f"{path}: bool {function}(...) {{ ... return ...; }} not found; "
                         "update benchmarks/analyze_io.py")
    expr = returns[-1]
    for term, name in HOST_TERMS.items():
        expr = re.sub(term, name, expr)
    try:
        return bool(eval_cpp_expr(expr, values))
    except ValueError as e:
        raise ValueError(f"{path}: {function}: {e}; update benchmarks/analyze_io.py's HOST_TERMS") from None


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


def middle_row_keys(cfg):
    """sm90::middle_row_keys (flash_fwd_sm90_tma.cuh) for a dense configuration: the keys its
    middle query row sees (top-left causal), what the Hopper route rules compare."""
    middle = cfg["seqlen_q"] // 2
    return min(cfg["seqlen_k"], middle + 1) if cfg["causal"] else cfg["seqlen_k"]


def _kernel(name, tile, variant=""):
    return {"kernel": name, "tile": tile, "variant": variant}


def sm80_kernels(cfg):
    """The sm_80-class kernels' launches (flash_launch.cuh's run_flash_fwd / run_flash_bwd off
    Hopper, and on it for float32; float64 the exact simt ones): {"fwd": kernel, "dq": kernel,
    "dkdv": [kernel, ...], "accum_dq": False}; a dK/dV kernel's "dk", "dv": what it computes."""
    dtype, d = cfg["dtype"], cfg["head_dim"]
    if dtype == "fp64":
        r = simt_rows_per_cta()  # CTA of r warps = r rows; its warps' loads of one row meet in L1
        return {"fwd": _kernel("flash_fwd_simt_kernel", (r, 1)), "dq": _kernel("flash_bwd_dq_simt_kernel", (r, 1)),
                "dkdv": [{**_kernel("flash_bwd_dkdv_simt_kernel", (1, r)), "dk": True, "dv": True}],
                "accum_dq": False}
    t = tile_shapes(head_dim_bucket(dtype, d), elem_bytes=ELEM_BYTES[dtype])
    f, b = t["FwdTile"], t["BwdTile"]
    dkdv_tile = (b["kDkvBlockM"], b["kDkvBlockN"])
    if b["kSplitDkDv"]:  # dK, then dV
        dkdv = [{**_kernel("flash_bwd_dkdv_kernel", dkdv_tile, "dK"), "dk": True, "dv": False},
                {**_kernel("flash_bwd_dkdv_kernel", dkdv_tile, "dV"), "dk": False, "dv": True}]
    else:
        dkdv = [{**_kernel("flash_bwd_dkdv_kernel", dkdv_tile), "dk": True, "dv": True}]
    return {"fwd": _kernel("flash_fwd_kernel", (f["kBlockM"], f["kBlockN"])),
            "dq": _kernel("flash_bwd_dq_kernel", (b["kDqBlockM"], b["kDqBlockN"])), "dkdv": dkdv,
            "accum_dq": False}


def sm90_forward(cfg, bucket):
    """The TMA forward's tile, as launch_fwd_tma (flash_launch.cuh) picks it for plain dense
    attention with the default switches."""
    values = {"middle_row_keys": middle_row_keys(cfg), "seqlen_q": cfg["seqlen_q"], "kHeadDim": bucket,
              "window_left": -1, "window_right": 0 if cfg["causal"] else -1,  # causal: a window (-1, 0)
              "banded_walks": True}  # the "persistentwindow" part, a default

    def tile(wide, persistent):
        return sm90_constants(SM90_FWD_TMA_CUH, "FwdSm90TmaKernel", ("kBlockM", "kBlockN", "kHasPersistent"),
                              kHeadDim=bucket, kWide=wide, kPersistent=persistent)

    for predicate in ("unmasked", "banded", "balanced_tiles", "long_rows", "wide_rows",
                      "persistent_wide_pays"):  # persistent_rows' terms
        values[predicate] = host_predicate(SM90_FWD_TMA_CUH, predicate, values)
    values["narrow_tile"] = not values["wide_rows"]  # CUFLASH_FWD_TILE unset
    walk = tile(False, False)["kHasPersistent"] and host_predicate(SM90_FWD_TMA_CUH, "persistent_rows", values)
    # launch_fwd_tma's order; head dim 64 is the one with a wide persistent kernel (`if constexpr`).
    if bucket == 64 and walk and values["persistent_wide_pays"]:
        wide, persistent = True, True
    elif values["wide_rows"]:
        wide, persistent = True, False
    else:
        wide, persistent = False, walk
    t = tile(wide, persistent)
    variant = ("wide" if wide else "narrow") + (", persistent" if persistent else "")
    return _kernel("flash_fwd_sm90_tma_kernel", (t["kBlockM"], t["kBlockN"]), variant)


def sm90_backward(cfg, bucket):
    """The warp-specialized Hopper backward, as run_flash_bwd (flash_launch.cuh) and
    prefers_fused_backward (backward_choice.cu) pick it with the default switches, either
    deterministic setting (ordered or unordered adds move the same bytes here): the fused dK/dV/dQ
    kernel, dQ added to dq_accum by TMA reduce-add, then dq_convert; else the dQ kernel and the
    dK/dV kernel (two launches, dK then dV, where BwdSm90Kernel::kSplitDkDv)."""
    values = {"middle_row_keys": middle_row_keys(cfg), "bucket": bucket, "kHeadDim": bucket,
              "features": False}  # the IO model's attention is plain

    def dkdv_tile(accum, with_dk, with_dv, wide):
        t = sm90_constants(SM90_BWD_TMA_CUH, "BwdDkvSm90TmaKernel", ("kBlockM", "kBlockN"), kHeadDim=bucket,
                           kAccumDq=accum, kWithDk=with_dk, kWithDv=with_dv, kWideSteps=wide, kOrderedDq=False)
        return t["kBlockM"], t["kBlockN"]

    split_dkdv = sm90_constants(SM90_BWD_CUH, "BwdSm90Kernel", ("kSplitDkDv",), kHeadDim=bucket)["kSplitDkDv"]
    if (host_predicate(BACKWARD_CHOICE_CU, "fused_backward_built_for", values)
            and host_predicate(BACKWARD_CHOICE_CU, "prefers_fused_backward", values)):
        if split_dkdv:  # run_flash_bwd: head dim 256's own fused kernel (launch_bwd_fused256)
            t = sm90_constants(SM90_BWD_FUSED256_CUH, "BwdFused256Kernel", ("kBlockM", "kBlockN"), kOrderedDq=False)
            dkdv = _kernel("flash_bwd_fused_sm90_tma_kernel", (t["kBlockM"], t["kBlockN"]), "fused dQ")
        else:  # 128-query steps (kWideSteps) at head dim 64 only, `if constexpr`
            wide = bucket == 64 and host_predicate(FLASH_LAUNCH_CUH, "fused_wide_steps_pay", values)
            dkdv = _kernel("flash_bwd_dkdv_sm90_tma_kernel", dkdv_tile(True, True, True, wide),
                           ("wide steps, " if wide else "") + "fused dQ")
        return {"dq": None, "dkdv": [{**dkdv, "dk": True, "dv": True}], "accum_dq": True}
    t = sm90_constants(SM90_BWD_TMA_CUH, "BwdDqSm90TmaKernel", ("kBlockM", "kBlockN"), kHeadDim=bucket)
    dq = _kernel("flash_bwd_dq_sm90_tma_kernel", (t["kBlockM"], t["kBlockN"]))
    if split_dkdv:
        dkdv = [{**_kernel("flash_bwd_dkdv_sm90_tma_kernel", dkdv_tile(False, True, False, False), "dK"),
                 "dk": True, "dv": False},
                {**_kernel("flash_bwd_dkdv_sm90_tma_kernel", dkdv_tile(False, False, True, False), "dV"),
                 "dk": False, "dv": True}]
    else:
        wide = bucket == 64  # bwd_wide_steps(true): CUFLASH_BWD_TILE's default
        dkdv = [{**_kernel("flash_bwd_dkdv_sm90_tma_kernel", dkdv_tile(False, True, True, wide),
                           "wide steps" if wide else ""), "dk": True, "dv": True}]
    return {"dq": dq, "dkdv": dkdv, "accum_dq": False}


ARCHS = ("sm90", "sm80")  # sm90: an sm_90a build on a compute capability 9.0 GPU (H100, H200)


def kernel_choice(cfg, arch):
    """The kernels our forward and backward ops launch for cfg on `arch` (ARCHS): plain dense
    attention, the default switches (run_switches.h), inputs TMA can address."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: one of {ARCHS}")
    plan = sm80_kernels(cfg)
    if arch == "sm90" and cfg["dtype"] in ("bf16", "fp16"):  # the Hopper kernels are 16-bit ones
        bucket = head_dim_bucket(cfg["dtype"], cfg["head_dim"])
        variables = sm90_variable_templates()
        if eval_cpp_expr(f"kFwdHeadDim<{bucket}>", {}, variables):
            plan["fwd"] = sm90_forward(cfg, bucket)
        if eval_cpp_expr(f"kBwdHeadDim<{bucket}>", {}, variables):
            plan.update(sm90_backward(cfg, bucket))
    return plan


def tiled_kernels(cfg, arch, dlse=False):
    """Our launches on `arch`, in order, each {"phase", "kernel", "tile", "variant", "read",
    "write"}, with the tile sizes they use. dlse: the backward was given a gradient of lse
    (autograd passes zeros)."""
    dtype, nq, nk, d = cfg["dtype"], cfg["seqlen_q"], cfg["seqlen_k"], cfg["head_dim"]
    bh, e, s = cfg["batch"] * cfg["heads"], ELEM_BYTES[dtype], STATS_BYTES[dtype]
    row, accum_row, causal = d * e, d * ACCUM_BYTES, cfg["causal"]
    plan = kernel_choice(cfg, arch)
    launches = []

    def launch(phase, kernel, read, write):
        launches.append({"phase": phase, "kernel": kernel["kernel"], "tile": kernel["tile"],
                         "variant": kernel["variant"], "read": int(read * bh), "write": int(write * bh)})

    fwd = plan["fwd"]
    q_rows, kv_rows = stream_keys(nq, nk, *fwd["tile"], causal)
    launch("fwd", fwd, q_rows * row + 2 * kv_rows * row, nq * row + nq * s)
    # delta = rowsum(out * dout); with dq_accum it also zeroes that (flash_bwd_delta_kernel).
    launch("bwd", _kernel("flash_bwd_delta_kernel", None), 2 * nq * row + (nq * s if dlse else 0),
           nq * s + (nq * accum_row if plan["accum_dq"] else 0))
    if plan["dq"]:
        q_rows, kv_rows = stream_keys(nq, nk, *plan["dq"]["tile"], causal)
        launch("bwd", plan["dq"], 2 * q_rows * row + 2 * nq * s + 2 * kv_rows * row, nq * row)
    for dkdv in plan["dkdv"]:
        k_rows, q_rows = stream_queries(nq, nk, *dkdv["tile"], causal)
        streamed = q_rows * (2 * row + 2 * s)  # Q, dO, lse, delta per key block
        # K always; V for dP, which dK needs (a dV-only launch loads none)
        resident = k_rows * row * (2 if dkdv["dk"] else 1)
        # the fused kernel: each key block reduce-adds its dQ part for every query row it streams
        accum = q_rows * accum_row if plan["accum_dq"] else 0
        launch("bwd", dkdv, resident + streamed + accum, nk * row * (dkdv["dk"] + dkdv["dv"]) + accum)
    if plan["accum_dq"]:
        launch("bwd", _kernel("flash_bwd_dq_convert_kernel", None), nq * accum_row, nq * row)
    return launches


def tiled_model(cfg, arch, dlse=False):
    launches = tiled_kernels(cfg, arch, dlse)
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


# What ncu profiles (--kernel-name regex:...): every kernel of ours a forward or backward
# launches; a test checks that it catches each `__global__` flash_*_kernel in csrc/cuda.
NCU_KERNEL_FILTER = r"flash_(fwd|bwd)"
# Our kernels' names: flash_<role>[_<family>]_kernel. family: none, the sm_80-class tensor-core
# kernels, or for the row kernels (delta, dq_convert, fwd_combine) every family's; simt, the exact
# ones; sm90, Hopper's cp.async ones; sm90_tma, Hopper's warp-specialized ones; sm90_fp32, Hopper's
# float32 forward on TF32 wgmmas (CUFLASH_FP32=wgmma).
KERNEL_NAME = re.compile(r"flash_(?P<role>fwd_combine|fwd|bwd_delta|bwd_dq_convert|bwd_dq|bwd_dkdv|bwd_fused)"
                         r"(?:_(?P<family>simt|sm90_tma|sm90_fp32|sm90))?_kernel")
SHARED_ROLES = ("fwd_combine", "bwd_delta", "bwd_dq_convert")  # one kernel for every family
KERNEL_FUNCTION = re.compile(r"\bflash_\w+")  # in a demangled name: after `cuflash::` and before `<` or `(`
NVTX_RANGE = re.compile(rf"{NVTX_TAG}\[([^\]/]+)/(fwd|bwd)\]")


def source_kernel_names():
    """The `__global__` kernels' names in csrc/cuda."""
    return sorted({name for path in sorted(CUDA_DIR.rglob("*.cu*"))
                   for name in re.findall(r"__global__[^;{]*?\b(\w+_kernel)\s*\(", _source(path))})


def short_name(function):
    return function[:-len("_kernel")] if function.endswith("_kernel") else function


def classify_kernel(name):
    """{"function", "role", "family", "phase"} of a kernel name as ncu prints it (demangled, or
    the function alone); None where it is not one the ncu filter profiles. A name the filter
    profiles but KERNEL_NAME does not know raises: its bytes would otherwise go uncounted."""
    if not re.search(NCU_KERNEL_FILTER, name):
        return None
    m = KERNEL_FUNCTION.search(name)
    role = KERNEL_NAME.fullmatch(m.group(0)) if m else None
    if not role:
        raise ValueError(f"kernel {name!r} matches the ncu filter {NCU_KERNEL_FILTER!r} but no role in "
                         "KERNEL_NAME (benchmarks/analyze_io.py): give it one, so that its bytes count in its pass")
    kind = role.group("role")
    family = role.group("family") or ("any" if kind in SHARED_ROLES else "sm80")
    return {"function": m.group(0), "role": kind, "family": family, "phase": "fwd" if kind.startswith("fwd") else "bwd"}


def kernels_path(functions):
    """The kernel families of a pass's kernels (the row kernels shared by every family left
    out): "sm90_tma", "sm80", "simt", or several joined by "+"."""
    families = []
    for f in functions:
        c = classify_kernel(f)
        if c and c["family"] != "any" and c["family"] not in families:
            families.append(c["family"])
    return "+".join(families) or "-"


def attribute(kernels, configs, nvtx_names=None):
    """{config key: {"fwd": [kernel, ...], "bwd": [...]}}, each kernel with classify_kernel's
    fields added. By the NVTX range each kernel ran in (nvtx_names: id -> renamed kernel name)
    where every kernel has one; otherwise by order: the driver runs, per config in order, the
    forward op then the backward op, so a forward kernel that follows a backward one starts the
    next config."""
    keys = [config_key(c) for c in configs]
    out = {k: {"fwd": [], "bwd": []} for k in keys}
    ours = []
    for k in kernels:
        role = classify_kernel(k["kernel"])
        if role:
            ours.append({**k, **role})
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
        phase = k["phase"]
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
             "--kernel-name", f"regex:{NCU_KERNEL_FILTER}", "-f", "-o", str(report),
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


def measured_arch(groups):
    """"sm90" where a Hopper kernel ran (an sm_90a build on a 9.0 GPU), else "sm80": the kernel
    choice the model follows for a measured run."""
    return "sm90" if any(k["family"].startswith("sm90") for passes in groups.values()
                         for kernels in passes.values() for k in kernels) else "sm80"


def analyze(configs, groups=None, arch="sm90"):
    """One record per config: the models per phase (tiled: the kernels our ops launch on
    `arch`), and what was measured if groups is given."""
    records = []
    for cfg in configs:
        launches = tiled_kernels(cfg, arch)
        rec = {**cfg, "arch": arch, "phases": {}}
        std, low = standard_model(cfg), min_model(cfg)
        for phase in ("fwd", "bwd"):
            modeled = [k for k in launches if k["phase"] == phase]
            p = {"standard": std[phase], "min": low[phase], "tiled": _add(*modeled),
                 "path": kernels_path([k["kernel"] for k in modeled]), "kernels": modeled}
            if groups is not None:
                measured = groups[config_key(cfg)][phase]
                functions = [k["function"] for k in measured]
                p["measured"] = {
                    "read": sum(k.get(METRICS[0]) or 0 for k in measured),
                    "write": sum(k.get(METRICS[1]) or 0 for k in measured),
                    "path": kernels_path(functions),
                    # the model describes these bytes only where it counts the same launches
                    "same_kernels": functions == [k["kernel"] for k in modeled],
                    "kernels": [{"kernel": k["function"], "name": k["kernel"], "grid": k["grid"],
                                 "read": k.get(METRICS[0]), "write": k.get(METRICS[1])} for k in measured]}
            rec["phases"][phase] = p
        records.append(rec)
    return records


def total(rw):
    return rw["read"] + rw["write"]


def kernel_list(functions):
    """"flash_bwd_delta, flash_bwd_dkdv x2": short names, a repeated launch counted."""
    runs = []
    for f in map(short_name, functions):
        if runs and runs[-1][0] == f:
            runs[-1][1] += 1
        else:
            runs.append([f, 1])
    return ", ".join(f if n == 1 else f"{f} x{n}" for f, n in runs) or "(none)"


def io_table(records):
    measured = any("measured" in p for r in records for p in r["phases"].values())
    head = ["D", "causal", "N", "B x H", "pass", "path", "standard GB", "min GB", "tiled GB",
            "tiled / min", "standard / tiled"]
    if measured:
        head += ["measured kernels", "measured read GB", "measured write GB", "measured / tiled",
                 "measured / min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        for phase, p in r["phases"].items():
            std, low, tiled = total(p["standard"]), total(p["min"]), total(p["tiled"])
            cells = [str(r["head_dim"]), "yes" if r["causal"] else "no", str(r["seqlen_q"]),
                     f"{r['batch']} x {r['heads']}", phase, p["path"], gb(std), gb(low), gb(tiled),
                     ratio(tiled, low), ratio(std, tiled)]
            if measured:
                m = p.get("measured")
                mt = total(m) if m else None
                cells += [kernel_list([k["kernel"] for k in m["kernels"]]) if m else "-",
                          gb(m and m["read"]), gb(m and m["write"]),
                          ratio(mt, tiled) if m and m["same_kernels"] else "-", ratio(mt, low)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def kernel_table(records):
    """Per launch: the model's, beside the measured one where the launches are the same; else
    the model's rows, then the measured kernels' (tile: "not modeled")."""
    head = ["D", "causal", "N", "pass", "kernel", "tile (M x N)", "tiled read GB", "tiled write GB",
            "measured read GB", "measured write GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        shape = [str(r["head_dim"]), "yes" if r["causal"] else "no", str(r["seqlen_q"])]
        for phase, p in r["phases"].items():
            m = p.get("measured")
            paired = m["kernels"] if m and m["same_kernels"] else []
            for i, k in enumerate(p["kernels"]):
                got = paired[i] if paired else {}
                name = short_name(k["kernel"]) + (f" ({k['variant']})" if k["variant"] else "")
                tile = f"{k['tile'][0]} x {k['tile'][1]}" if k["tile"] else "-"
                lines.append("| " + " | ".join(shape + [phase, name, tile, gb(k["read"]), gb(k["write"]),
                                                        gb(got.get("read")), gb(got.get("write"))]) + " |")
            for got in (m["kernels"] if m and not paired else []):
                lines.append("| " + " | ".join(shape + [phase, short_name(got["kernel"]), "not modeled", "-", "-",
                                                        gb(got["read"]), gb(got["write"])]) + " |")
    return "\n".join(lines) + "\n"


EXPLANATION = """\
- **standard**: attention that writes S = QK^T and P = softmax(S) to HBM and reads them back
  (the FlashAttention paper's Algorithm 0; backward, Algorithm 3, also stores dP and dS):
  forward reads Q, K, V, S, P and writes S, P, O; backward reads P, dO, V, dP, dS, K, Q and
  writes dV, dP, dS, dQ, dK. N x N elements at the input's element size, full even when causal.
- **min**: each input read once and each output written once (forward: q, k, v -> out, lse;
  backward: q, k, v, out, dout, lse -> dq, dk, dv). No kernel moves less.
- **tiled**: the kernels named in **path** (and per kernel below), as our ops pick them for the
  shape with the default switches on the model's GPU: **sm90_tma**, Hopper's warp-specialized
  kernels (16-bit, head-dim buckets 64, 128, 256; `csrc/cuda/sm90/`), **sm80**, the sm_80-class
  tensor-core kernels (other GPUs; on Hopper float32 and the other buckets), **simt**, float64's.
  Their global loads and stores each count as an HBM access (the paper's accounting, Theorem 2),
  with the tile sizes of the headers (`tile_shapes.h`, `sm90/*.cuh`): the forward reads Q once
  and K, V once per query block (ceil(N / BM) times; causal about half); the backward's delta
  kernel reads out and dout; a dQ kernel reads Q, dO, lse, delta once and K, V once per query
  block; a dK/dV kernel reads K, V once and Q, dO, lse, delta once per key block (at D = 256,
  dK and dV are two launches that both stream Q, dO, lse, delta). Hopper's fused backward
  (D = 64; D = 128 from 512 keys a row) has no dQ kernel: its dK/dV kernel adds each key
  block's dQ part to an fp32 buffer by TMA reduce-add (a read and a write of 4 D bytes per
  streamed query row and key block, counted as HBM traffic though the adds happen in L2), which
  the delta kernel zeroes and dq_convert turns into dq.
  Per pass, standard / tiled is about 2 BM / D (S and P cost 4 N^2 elements, the K/V re-reads
  2 N D (N / BM)): with 64-row query tiles (the sm_80-class dQ kernel's) the tiled count is
  below the standard one only for D < 128, and what makes the tiled kernels cheap in DRAM is
  the L2 (next line).
- **measured**: Nsight Compute's `dram__bytes_read.sum` and `dram__bytes_write.sum`, summed
  over every one of our kernels of each pass (**measured kernels**; a kernel the script cannot
  place stops the run), L2 flushed before each kernel. measured / tiled is shown only where
  those are the launches modeled (same kernels, same order); else "-". Far below **tiled**, near
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
    arch = ", ".join(sorted({r["arch"] for r in records}))
    parts.append("`benchmarks/analyze_io.py`. GB = 1e9 bytes; each pass once (fwd: our forward op; "
                 "bwd: our backward op), dtype " + ", ".join(sorted({r["dtype"] for r in records}))
                 + f", layout [B, H, N, D]; tiled: the kernels our ops launch on {arch} "
                 "(**path**).\n")
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
    p.add_argument("--arch", choices=ARCHS, default="sm90",
                   help="the GPU whose kernel choice the tiled model follows: sm90, H100/H200 with an "
                        "sm_90a build (default); sm80, any other (or Hopper under CUFLASH_SM90=0). With "
                        "--measure, taken from the kernels that ran")
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
        print(render_markdown(analyze(configs, arch=args.arch)))
        return 0
    ncu = find_ncu(args.ncu)
    if ncu is None:
        print("error: ncu (Nsight Compute) not found; pass --ncu PATH", file=sys.stderr)
        return 2
    env, groups, how = measure(configs, ncu, args.timeout)
    arch = measured_arch(groups)
    records = analyze(configs, groups, arch)
    markdown = render_markdown(records, env, how)
    from bench_attention import slug
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{slug(env['gpu'])}-{env['date']}-io"
    run_record = {"env": env, "attributed_by": how, "arch": arch, "configs": records}
    stem.with_suffix(".json").write_text(json.dumps(run_record, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
