#!/usr/bin/env python3
"""Time cuflash_attn.flash_attention against torch's SDPA backends (see /work/shared/PERF.md).

Standard table: batch * seqlen = 16384 tokens, hidden 2048 (heads = 2048 // head_dim),
head_dim in {64, 128, 256}, seqlen 512..16384, causal and not, bf16. Every implementation runs
in the same process on the same inputs, timed in --rounds rounds interleaved with the others'
(the median of its rounds is its figure; each round's are in the JSON); results go to
benchmarks/results/<gpu-slug>-<YYYY-MM-DD>.json (and a .md table next to it). Each row also keeps
the GPU's state after its configuration's rounds (nvidia-smi: gpu_state) and, where NVML loads,
its implementation's SM clock, power and slowdown share while its steps ran (gpu_clocks); the
table's header sums both up.

    python3 benchmarks/bench_attention.py                 # the standard table
    python3 benchmarks/bench_attention.py --quick         # a fast subset
    python3 benchmarks/bench_attention.py --memory        # peak memory against seqlen
    python3 benchmarks/bench_attention.py --dtypes fp16 --merge   # add rows to today's file
"""
import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# The shapes: one place.

TOTAL_TOKENS = 16384
HIDDEN = 2048
HEAD_DIMS = (64, 128, 256)
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_HEAD_DIMS = (64, 128)
QUICK_SEQLENS = (1024, 4096)
QUICK_DTYPES = ("bf16",)

MEMORY_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
MEMORY_BATCH, MEMORY_HEADS, MEMORY_HEAD_DIM, MEMORY_DTYPE = 1, 16, 128, "bf16"
MEMORY_IMPLS = ("cuflash_attn", "sdpa_cudnn", "sdpa_math")

OURS = "cuflash_attn"
OURS_NONDET = "cuflash_attn_nondet"  # ours with deterministic=False: dq may be added up with atomics
ALL_IMPLS = (OURS, OURS_NONDET, "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math")
SHORT_NAMES = {OURS: "ours", OURS_NONDET: "ours nondet", "sdpa_flash": "flash", "sdpa_cudnn": "cudnn",
               "sdpa_efficient": "efficient", "sdpa_math": "math"}
LAYOUTS = ("bhnd", "bnhd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp64": torch.float64}
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
                 "float": "fp32", "float64": "fp64", "double": "fp64"}

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def standard_shapes(head_dims, seqlens):
    """(batch, heads, seqlen, head_dim) of the standard table."""
    return [(max(1, TOTAL_TOKENS // n), HIDDEN // d, n, d) for d in head_dims for n in seqlens]


# ---------------------------------------------------------------------------------------------
# The implementations: name -> factory(causal) -> fn(q, k, v) -> out.

def import_cuflash_attn():
    """The installed package, or the repo's own in-place build if none is installed. Called
    lazily, so --help works without the extension."""
    try:
        import cuflash_attn
    except ModuleNotFoundError as e:
        if e.name != "cuflash_attn":
            raise
        sys.path.insert(0, str(REPO_ROOT))
        import cuflash_attn
    return cuflash_attn


def _ours_factory(deterministic=True):
    cuflash_attn = import_cuflash_attn()

    def make(causal):
        return lambda q, k, v: cuflash_attn.flash_attention(q, k, v, causal=causal, scale=None,
                                                            deterministic=deterministic)
    return make


def _sdpa_factory(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)

    def make(causal):
        def fn(q, k, v):
            # The backend is chosen at forward; the autograd node then runs its own backward.
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=None)
        return fn
    return make


IMPL_FACTORIES = {
    OURS: _ours_factory,
    OURS_NONDET: lambda: _ours_factory(deterministic=False),
    "sdpa_flash": lambda: _sdpa_factory("FLASH_ATTENTION"),
    "sdpa_cudnn": lambda: _sdpa_factory("CUDNN_ATTENTION"),
    "sdpa_efficient": lambda: _sdpa_factory("EFFICIENT_ATTENTION"),
    "sdpa_math": lambda: _sdpa_factory("MATH"),
}


def split_variant(name):
    """'cuflash_attn@CUFLASH_SM90=tma+...' -> ('cuflash_attn', {'CUFLASH_SM90': 'tma'}): our
    kernels under run-time switches, timed in the same run as the plain name (A/B). The
    switches are set for the whole measurement of that implementation, backward included."""
    base, _, spec = name.partition("@")
    env = dict(item.split("=", 1) for item in spec.split("+") if "=" in item) if spec else {}
    return base, env


@contextlib.contextmanager
def switches_set(env):
    """The environment variables env ({name: value}) set inside the block, restored after (the
    run-time switches are read at each call)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def environment_of(name):
    """The switches of a variant name (split_variant) set inside the block."""
    return switches_set(split_variant(name)[1])


def load_impls(names):
    """name -> make(causal), or name -> error string when the implementation cannot load."""
    impls = {}
    for name in names:
        try:
            impls[name] = IMPL_FACTORIES[split_variant(name)[0]]()
        except Exception as e:  # e.g. the extension is not built
            impls[name] = f"import failed: {first_line(e)}"
            log(f"warning: {name}: {impls[name]}")
    return impls


# ---------------------------------------------------------------------------------------------
# Small helpers.

_write = None  # tqdm.write while a tqdm bar is shown


def log(msg):
    if _write is not None:
        _write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)


def first_line(exc):
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0].strip()
    line = re.sub(r"\s*\(Triggered internally at .*$", "", line)
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        line = line.split(" GPU ")[0]  # "CUDA out of memory. Tried to allocate X GiB."
    return line


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def parse_list(text, cast=str):
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def parse_impls(text):
    """--impls: comma-separated names, where a variant's switch value may hold commas itself
    (cuflash_attn@CUFLASH_SM90=tma,features): a piece that names no implementation continues
    the variant before it."""
    impls = []
    for piece in parse_list(text):
        if impls and "@" in impls[-1] and split_variant(piece)[0] not in IMPL_FACTORIES:
            impls[-1] += "," + piece
        else:
            impls.append(piece)
    return impls


def parse_dtype(text):
    key = DTYPE_ALIASES.get(text.lower(), text.lower())
    if key not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r} (use {', '.join(DTYPES)})")
    return key


def fwd_flops(batch, heads, seqlen_q, seqlen_k, head_dim, causal):
    flops = 4 * batch * heads * seqlen_q * seqlen_k * head_dim
    return flops / 2 if causal else flops


def tflops(flops, ms):
    return flops / (ms * 1e-3) / 1e12 if ms and ms > 0 else None


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def mib(nbytes):
    return nbytes / 2**20


# ---------------------------------------------------------------------------------------------
# Timing and memory.

def _event_bench(fn, warmup_ms, rep_ms):
    """Fallback for triton.testing.do_bench: device events, L2 flushed, median in ms."""
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warmup, n_rep = max(1, int(warmup_ms / estimate)), max(1, int(rep_ms / estimate))
    for _ in range(n_warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        cache.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def make_timer(warmup_ms, rep_ms):
    try:
        from triton.testing import do_bench
    except Exception:
        log("triton not importable: timing with torch.cuda.Event")
        return lambda fn: at_least_repeats(lambda rep: _event_bench(fn, warmup_ms, rep), rep_ms)
    return lambda fn: at_least_repeats(lambda rep: do_bench(fn, warmup=warmup_ms, rep=rep, return_mode="median"),
                                       rep_ms)


# A median of fewer timings than this is one of 1-3 samples: do_bench repeats for rep_ms, which a
# long step (D=256 forward + backward at 16384 keys, ~16 ms; the memory-efficient peer's ~150)
# fills in one or two runs. Such a step is timed again over MIN_REPEATS of its length.
MIN_REPEATS = 10


def at_least_repeats(bench, rep_ms):
    """bench(rep) (a median in ms over rep ms of repeats), again over MIN_REPEATS steps' time where
    its first median says rep_ms held fewer."""
    ms = bench(rep_ms)
    return bench(MIN_REPEATS * ms) if ms * MIN_REPEATS > rep_ms else ms


def peak_mib(step):
    """Peak memory allocated by step() beyond what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return mib(torch.cuda.max_memory_allocated() - before)


def make_inputs(batch, heads, seqlen, head_dim, dtype, layout, seed=0):
    """q, k, v (requiring grad) and dout, [B, H, N, D]; for bnhd, views of [B, N, H, D] storage."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, heads, seqlen, head_dim) if layout == "bhnd" else (batch, seqlen, heads, head_dim)

    def one(requires_grad):
        t = torch.randn(shape, generator=gen, device="cuda", dtype=dtype)
        t.requires_grad_(requires_grad)
        return t if layout == "bhnd" else t.transpose(1, 2)
    q, k, v = (one(True) for _ in range(3))
    return q, k, v, one(False)


def fwd_step(fn, q, k, v):
    qd, kd, vd = q.detach(), k.detach(), v.detach()  # requires_grad=False: no autograd graph
    return lambda: fn(qd, kd, vd)


def training_fwd_step(fn, q, k, v):
    """The forward that forward+backward runs (inputs that require grad): the one its time is less
    to leave the backward's. Without grad, torch's SDPA asks the cuDNN and memory-efficient
    backends for no logsumexp (an inference forward, faster), so that subtracting fwd_step's time
    would charge their backward with the difference; ours and FlashAttention-2 compute it either way."""
    return lambda: fn(q, k, v)


def fwdbwd_step(fn, q, k, v, dout):
    def step():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)  # no .grad accumulation between reps
    return step


@contextlib.contextmanager
def reasons_on_error():
    """SDPA explains a refusal in warnings, then raises 'No available kernel': keep the why."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except Exception as e:
            why = [first_line(w.message) for w in caught if str(w.message).strip()]
            # Drop the headers ("... kernel not used because:") and the other backends' notes.
            why = [w for w in why if not w.endswith(":") and "runtime disabled" not in w]
            msg = first_line(e)
            if why and "No available kernel" in msg:
                msg = f"No available kernel: {why[0]}"
            raise RuntimeError(msg) from None


def probe(fn, q, k, v, dout):
    """One forward and one forward+backward; raises with a one-line reason on refusal."""
    try:
        with reasons_on_error():
            fwd_step(fn, q, k, v)()
    except Exception as e:
        raise RuntimeError(f"forward: {first_line(e)}") from None
    try:
        with reasons_on_error():
            fwdbwd_step(fn, q, k, v, dout)()
    except Exception as e:
        raise RuntimeError(f"backward: {first_line(e)}") from None
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# The standard table.

def base_row(name, shape, causal, dtype, layout):
    batch, heads, seqlen, head_dim = shape
    return {"impl": name, "dtype": dtype_name(dtype), "layout": layout, "batch": batch,
            "heads": heads, "seqlen_q": seqlen, "seqlen_k": seqlen, "head_dim": head_dim,
            "causal": causal}


def prepare_row(name, make, shape, causal, dtype, layout, inputs, skip_math_above):
    """(row, steps): the row with its peak memory, and its (forward, forward+backward, training
    forward) steps on the shared inputs (q, k, v, dout) to time; steps None where it failed or is skipped
    (row["error"] says why)."""
    row = base_row(name, shape, causal, dtype, layout)
    if isinstance(make, str):
        return {**row, "error": make}, None
    if name == "sdpa_math" and skip_math_above is not None and shape[2] > skip_math_above:
        return {**row, "error": f"skipped: math stores the N x N matrix (seqlen > {skip_math_above})"}, None
    q, k, v, dout = inputs
    try:
        with environment_of(name):
            fn = make(causal)
            probe(fn, q, k, v, dout)
            row["peak_mib"] = peak_mib(fwdbwd_step(fn, q, k, v, dout))
    except Exception as e:
        return {**row, "error": first_line(e)}, None
    return row, (fwd_step(fn, q, k, v), fwdbwd_step(fn, q, k, v, dout), training_fwd_step(fn, q, k, v))


def add_timing_arguments(parser):
    """--warmup-ms, --rep-ms and --rounds, as this file's and the other interleaved benchmarks'
    command lines take them (check_timing_arguments after parsing)."""
    parser.add_argument("--warmup-ms", type=float, default=10.0, help="warm-up per timing (default 10)")
    parser.add_argument("--rep-ms", type=float, default=40.0, help="repeats per timing (default 40)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timings of each cell, interleaved with the others' in a rotating order; each "
                             "figure is their median (default 3)")


def check_timing_arguments(parser, args):
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be at least 1")


def parse_timed_command_line(parser, argv):
    """An interleaved benchmark of our op (bench_features.py, bench_varlen.py): its arguments
    parsed and checked, the library loaded, the GPU warmed up (as run_standard does); (args, the
    timer)."""
    args = parser.parse_args(argv)
    check_timing_arguments(parser, args)
    import_cuflash_attn()
    warm_up_gpu()
    return args, make_timer(args.warmup_ms, args.rep_ms)


def markdown_header(head):
    """A markdown table's header and rule lines."""
    return "| " + " | ".join(head) + " |\n|" + "---|" * len(head)


def interleaved_timings(steps, timer, rounds, environment=environment_of, sampler=None):
    """{name: (a list of ms a round for each of its steps) or the error's line}, steps being
    {name: (step, ...)} (here: the forward, the forward+backward): each name's steps timed once a
    round under environment(name), the order rotated a place each round, so that a slow spell of
    the machine (a backward of 0.1 ms is mostly host launches: four runs of one route read
    149-199 TFLOP/s on an H200) lands on one round of several implementations, not on all rounds
    of one; the caller takes the medians. sampler (a ClockSampler): its samples taken while a
    name's steps run are that name's."""
    names = list(steps)
    samples = {name: tuple([] for _ in steps[name]) for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            if not isinstance(samples[name], tuple):
                continue  # failed in an earlier round
            try:
                with environment(name), (sampler.timing(name) if sampler else contextlib.nullcontext()):
                    for times, fn in zip(samples[name], steps[name]):
                        times.append(timer(fn))
            except Exception as e:
                samples[name] = first_line(e)
    return samples


def timed_fields(fwd_rounds, fwdbwd_rounds, shape, causal, train_fwd_rounds=None):
    """A row's timings from its rounds: the medians. backward = forward+backward less the training
    forward (training_fwd_step; each round's too, in bwd_ms_rounds), or less the forward where a
    row has no training forward (results from before it was timed)."""
    batch, heads, seqlen, head_dim = shape
    fwd_ms, fwdbwd_ms = statistics.median(fwd_rounds), statistics.median(fwdbwd_rounds)
    less = fwd_rounds if train_fwd_rounds is None else train_fwd_rounds
    bwd_ms = fwdbwd_ms - statistics.median(less)
    flops = fwd_flops(batch, heads, seqlen, seqlen, head_dim, causal)
    fields = {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwdbwd_ms": fwdbwd_ms,
              "fwd_tflops": tflops(flops, fwd_ms), "bwd_tflops": tflops(2.5 * flops, bwd_ms),
              "fwd_ms_rounds": list(fwd_rounds), "fwdbwd_ms_rounds": list(fwdbwd_rounds),
              "bwd_ms_rounds": [b - f for f, b in zip(less, fwdbwd_rounds)]}
    if train_fwd_rounds is not None:
        fields.update(train_fwd_ms=statistics.median(train_fwd_rounds), train_fwd_ms_rounds=list(train_fwd_rounds))
    return fields


def measure_configuration(impls, shape, causal, dtype, layouts, timer, rounds, skip_math_above, sampler=None):
    """Every implementation's row on one configuration, on the same inputs, for each of layouts
    (one name or a list; rows layout by layout, implementations in the order given). With several
    layouts, every (implementation, layout) pair is timed in the same interleaved rounds, so that
    a layout's ratio to another (issue 6: [B, N, H, D] within 3% of [B, H, N, D]) is not also
    the ratio of two slow or fast spells of the machine (separate runs moved whole rows by 4-6%);
    such rows name the layouts they were timed with (layouts_interleaved). sampler: each row keeps
    the clocks sampled while its steps ran (gpu_clocks)."""
    layouts = [layouts] if isinstance(layouts, str) else list(layouts)
    prepared = {}  # (impl, layout): (row, steps)
    for layout in layouts:
        try:
            inputs = make_inputs(*shape, dtype, layout)
        except Exception as e:  # e.g. out of memory: every row of the layout says so
            free_memory()
            for name in impls:
                prepared[name, layout] = ({**base_row(name, shape, causal, dtype, layout),
                                           "error": f"inputs: {first_line(e)}"}, None)
            continue
        for name, make in impls.items():
            prepared[name, layout] = prepare_row(name, make, shape, causal, dtype, layout, inputs,
                                                 skip_math_above)
        del inputs
    samples = interleaved_timings({key: steps for key, (_, steps) in prepared.items() if steps is not None},
                                  timer, rounds, environment=lambda key: environment_of(key[0]), sampler=sampler)
    state = gpu_state() if samples else None  # right after the rounds, before the GPU idles
    clocks = sampler.take() if sampler else {}
    rows = []
    for key, (row, _) in prepared.items():
        got = samples.get(key)
        if isinstance(got, str):
            row["error"] = got
        elif got is not None:
            fwd_rounds, fwdbwd_rounds, train_fwd_rounds = got
            row.update(timed_fields(fwd_rounds, fwdbwd_rounds, shape, causal, train_fwd_rounds))
            if state:
                row["gpu_state"] = state
            if clocks.get(key):
                row["gpu_clocks"] = clocks[key]
        if len(layouts) > 1:
            row["layouts_interleaved"] = layouts
        rows.append(row)
    del prepared, samples
    free_memory()
    return rows


# ---------------------------------------------------------------------------------------------
# The GPU's state after each configuration's rounds: a row slowed by a power cap or heat says so.

# nvidia-smi's clocks_event_reasons bits (nvml.h's nvmlClocksEventReason*).
CLOCK_EVENT_REASONS = {0x1: "idle", 0x2: "applications_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
                       0x10: "sync_boost", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake",
                       0x100: "display_clocks"}
SLOWDOWN_REASONS = ("sw_power_cap", "hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake")
GPU_STATE_FIELDS = (("sm_clock_mhz", "clocks.sm"), ("mem_clock_mhz", "clocks.mem"), ("power_w", "power.draw"),
                    ("temperature_c", "temperature.gpu"), ("reasons", "clocks_event_reasons.active"))
OLD_REASONS_FIELD = "clocks_throttle_reasons.active"  # the name before driver 535


def clock_event_reasons(mask):
    """The names of a clocks_event_reasons bitmask's bits (unknown bits as hex)."""
    names = [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]
    rest = mask & ~sum(CLOCK_EVENT_REASONS)
    return names + ([hex(rest)] if rest else [])


def parse_gpu_state(line):
    """One line of `nvidia-smi --query-gpu=<GPU_STATE_FIELDS> --format=csv,noheader,nounits`: a dict,
    a field nvidia-smi cannot read ("[N/A]", "[Not Supported]") as None."""
    values = [v.strip() for v in line.split(",")]
    if len(values) != len(GPU_STATE_FIELDS):
        return None
    state = {}
    for (key, _), value in zip(GPU_STATE_FIELDS, values):
        try:
            number = int(value, 16) if key == "reasons" else float(value)
        except ValueError:
            number = None
        state[key] = clock_event_reasons(number) if key == "reasons" and number is not None else number
    return state


def gpu_state():
    """The current GPU's clocks, power, temperature and clock-event reasons by nvidia-smi, or None
    where it cannot tell (no nvidia-smi, an old driver). The GPU picked by its UUID, since
    CUDA_VISIBLE_DEVICES may renumber the GPUs."""
    try:
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        select = ["-i", uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"]
    except Exception:
        select = []
    for reasons_field in (GPU_STATE_FIELDS[-1][1], OLD_REASONS_FIELD):
        fields = ",".join([f for _, f in GPU_STATE_FIELDS[:-1]] + [reasons_field])
        try:
            out = subprocess.run(["nvidia-smi", *select, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode == 0 and out.stdout.strip():
            return parse_gpu_state(out.stdout.strip().splitlines()[0])
    return None


# The SM clock, power and slowdown reasons while each implementation's steps run: a
# configuration's one nvidia-smi reading, after all its implementations' rounds, cannot say whose
# kernels ran at which clock (the H100 table of 2026-12-07 ran under its power cap after 30 of 36
# configurations, SM 1305-1980 MHz). NVML through ctypes: no package to install.
NVML_CLOCK_SM = 1  # nvml.h's nvmlClockType_t


def nvml_reader():
    """read() -> (SM clock MHz, power W or None, clock-event reasons bitmask) of the current GPU by
    NVML, or None where libnvidia-ml cannot be loaded or does not find the GPU."""
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        handle = ctypes.c_void_p()
        if lib.nvmlInit_v2() != 0 or lib.nvmlDeviceGetHandleByUUID(
                (uuid if uuid.startswith("GPU-") else f"GPU-{uuid}").encode(), ctypes.byref(handle)) != 0:
            return None
        # The name before driver 535 (nvidia-smi's OLD_REASONS_FIELD's).
        reasons = (getattr(lib, "nvmlDeviceGetCurrentClocksEventReasons", None)
                   or lib.nvmlDeviceGetCurrentClocksThrottleReasons)
    except (OSError, AttributeError, RuntimeError, AssertionError):
        return None

    def read():
        clock, milliwatts, mask = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_ulonglong()
        if lib.nvmlDeviceGetClockInfo(handle, NVML_CLOCK_SM, ctypes.byref(clock)) != 0:
            return None
        watts = milliwatts.value / 1000 if lib.nvmlDeviceGetPowerUsage(handle, ctypes.byref(milliwatts)) == 0 else None
        return float(clock.value), watts, mask.value if reasons(handle, ctypes.byref(mask)) == 0 else 0

    return read if read() is not None else None


class ClockSampler:
    """read() every interval_s on a thread while a label is set (timing(label)); take() gives each
    label's samples summarized (summarize_clocks) and starts afresh."""

    def __init__(self, read, interval_s=0.01):
        self._read, self._interval_s = read, interval_s
        self._label, self._samples = None, {}
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self._interval_s):
            label = self._label
            if label is None:
                continue
            try:
                sample = self._read()
            except Exception:  # noqa: BLE001 (a failed reading is no sample)
                sample = None
            if sample is not None:
                with self._lock:
                    self._samples.setdefault(label, []).append(sample)

    @contextlib.contextmanager
    def timing(self, label):
        self._label = label
        try:
            yield
        finally:
            self._label = None

    def take(self):
        with self._lock:
            samples, self._samples = self._samples, {}
        return {label: summarize_clocks(got) for label, got in samples.items()}

    def close(self):
        self._stop.set()
        self._thread.join()


def summarize_clocks(samples):
    """(clock MHz, power W or None, reasons bitmask) samples: the mean and lowest SM clock, the mean
    power, the share of samples under a power or thermal slowdown, and those reasons."""
    slowdowns = [set(clock_event_reasons(mask)) & set(SLOWDOWN_REASONS) for _, _, mask in samples]
    powers = [watts for _, watts, _ in samples if watts is not None]
    return {"samples": len(samples), "sm_clock_mhz": statistics.mean(c for c, _, _ in samples),
            "sm_clock_mhz_min": min(c for c, _, _ in samples),
            "power_w": statistics.mean(powers) if powers else None,
            "slowdown_share": sum(1 for r in slowdowns if r) / len(samples),
            "reasons": sorted(set().union(*slowdowns))}


def clock_sampler():
    """A started ClockSampler of the current GPU, or None (said in the log) where NVML is not there."""
    read = nvml_reader()
    if read is None:
        log("NVML not readable: no clocks sampled while each implementation runs")
        return None
    return ClockSampler(read)


def clocks_line(rows):
    """Each implementation's SM clock while it ran (the rows' gpu_clocks: the mean of the
    configurations' means, their lowest sample) and its share of samples under a slowdown, for the
    markdown's header; "" where no row has them."""
    by_impl = {}
    for r in rows:
        if r.get("gpu_clocks"):
            name = r["impl"] + (f" {r['layout']}" if r.get("layouts_interleaved") else "")
            by_impl.setdefault(name, []).append(r["gpu_clocks"])
    if not by_impl:
        return ""
    parts = []
    for name, got in by_impl.items():
        powers = [g["power_w"] for g in got if g.get("power_w") is not None]
        parts.append(f"{name} {statistics.mean(g['sm_clock_mhz'] for g in got):.0f} MHz (lowest "
                     f"{min(g['sm_clock_mhz_min'] for g in got):.0f})"
                     + (f", {statistics.mean(powers):.0f} W" if powers else "")
                     + f", {100 * statistics.mean(g['slowdown_share'] for g in got):.0f}% of samples slowed")
    return ("SM clock while each implementation's steps ran (NVML every 10 ms, the mean over "
            f"{max(len(g) for g in by_impl.values())} configurations): " + "; ".join(parts) + ".\n")


def gpu_state_line(rows):
    """The range of the rows' GPU states, and the configurations a slowdown reason was active
    after, for the markdown's header; "" where no row has a state."""
    states = {}
    for r in rows:
        if r.get("gpu_state"):
            key = (r["dtype"], r["head_dim"], r["seqlen_q"], r["causal"])
            states[key] = r["gpu_state"]
    if not states:
        return ""

    def span(key, unit):
        values = [s[key] for s in states.values() if s.get(key) is not None]
        if not values:
            return None
        low, high = min(values), max(values)
        return f"{low:.0f} {unit}" if low == high else f"{low:.0f}-{high:.0f} {unit}"

    parts = [p for p in (span("sm_clock_mhz", "MHz SM"), span("mem_clock_mhz", "MHz memory"),
                         span("power_w", "W"), span("temperature_c", "C")) if p]
    slowed = {}
    for (dtype, d, n, causal), s in sorted(states.items(), key=lambda kv: str(kv[0])):
        for reason in set(s.get("reasons") or ()) & set(SLOWDOWN_REASONS):
            slowed.setdefault(reason, []).append(f"{dtype} D={d} N={n}{' causal' if causal else ''}")
    line = (f"GPU state after each configuration's rounds (nvidia-smi, {len(states)} configurations): "
            + ", ".join(parts) + ". ")
    if slowed:
        line += "Slowdown reasons active: " + "; ".join(
            f"{reason} after {len(where)} ({', '.join(where)})" for reason, where in sorted(slowed.items())) + "."
    else:
        line += "No power or thermal slowdown reason was active."
    return line + "\n"


def warm_up_gpu(seconds=0.5):
    """Matmuls for a while before the first timing: an idle GPU starts at its lowest clocks (an
    H200 read 345 MHz), which the first implementation's warm-up alone may not lift."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    while True:
        for _ in range(20):
            a @ a
        end.record()
        end.synchronize()
        if start.elapsed_time(end) >= seconds * 1e3:
            return


def configurations(dtypes, head_dims, seqlens, causals):
    return [(dtype, shape, causal)
            for dtype in dtypes for shape in standard_shapes(head_dims, seqlens) for causal in causals]


def progress(items):
    """Yields (i, item); the caller logs '[i/n] ...'. A tqdm bar too when tqdm is importable."""
    global _write
    try:
        from tqdm import tqdm
    except ImportError:
        yield from enumerate(items, 1)
        return
    _write = tqdm.write
    try:
        yield from enumerate(tqdm(items, file=sys.stderr, dynamic_ncols=True), 1)
    finally:
        _write = None


def describe(dtype, layouts, shape, causal):
    b, h, n, d = shape
    return f"{dtype_name(dtype)} {','.join(layouts)} D={d} N={n} B={b} H={h} causal={causal}"


def run_standard(args, impls, timer):
    configs = configurations([DTYPES[d] for d in args.dtypes], args.head_dims, args.seqlens, args.causals)
    warm_up_gpu()
    sampler = clock_sampler()
    rows = []
    try:
        for i, (dtype, shape, causal) in progress(configs):
            log(f"[{i}/{len(configs)}] {describe(dtype, args.layouts, shape, causal)}")
            for row in measure_configuration(impls, shape, causal, dtype, args.layouts, timer, args.rounds,
                                             args.skip_math_above, sampler=sampler):
                log("    " + summarize(row))
                rows.append(row)
    finally:
        if sampler:
            sampler.close()
    return rows


def summarize(row):
    name = row["impl"] + (f" {row['layout']}" if row.get("layouts_interleaved") else "")
    if "error" in row:
        return f"{name:<15} error: {row['error']}"
    return (f"{name:<15} fwd {row['fwd_ms']:.3f} ms {row['fwd_tflops']:.1f} TFLOP/s, "
            f"bwd {row['bwd_ms']:.3f} ms {row['bwd_tflops'] or 0:.1f} TFLOP/s, "
            f"peak {row['peak_mib']:.0f} MiB")


# ---------------------------------------------------------------------------------------------
# The memory sweep.

def measure_memory(make, seqlen, dtype):
    fn = make(False)
    q, k, v, dout = make_inputs(MEMORY_BATCH, MEMORY_HEADS, seqlen, MEMORY_HEAD_DIM, dtype, "bhnd")
    probe(fn, q, k, v, dout)
    fwd = peak_mib(fwd_step(fn, q, k, v))
    fwdbwd = peak_mib(fwdbwd_step(fn, q, k, v, dout))
    return {"fwd_peak_mib": fwd, "fwdbwd_peak_mib": fwdbwd,
            "per_token_kib": fwdbwd * 1024 / (MEMORY_BATCH * seqlen)}


def run_memory(args, impls):
    dtype = DTYPES[MEMORY_DTYPE]
    configs = [(n, name) for n in MEMORY_SEQLENS for name in impls]
    rows = []
    for i, (seqlen, name) in progress(configs):
        log(f"[{i}/{len(configs)}] memory {name} N={seqlen}")
        row = {"impl": name, "dtype": dtype_name(dtype), "batch": MEMORY_BATCH,
               "heads": MEMORY_HEADS, "head_dim": MEMORY_HEAD_DIM, "causal": False, "seqlen": seqlen}
        make = impls[name]
        if isinstance(make, str):
            row["error"] = make
        elif name == "sdpa_math" and seqlen > args.memory_math_max:
            row["error"] = f"skipped: math stores the N x N matrix (seqlen > {args.memory_math_max})"
        else:
            try:
                with environment_of(name):
                    row.update(measure_memory(make, seqlen, dtype))
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as e:
                row["error"] = first_line(e)
            free_memory()
        log("    " + (f"error: {row['error']}" if "error" in row else
                      f"fwd {row['fwd_peak_mib']:.0f} MiB, fwd+bwd {row['fwdbwd_peak_mib']:.0f} MiB"))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Environment, output files and the markdown tables.

def git_commit():
    """HEAD, with "+changes" where tracked files differ from it. The device tool's copy of the
    tree can carry a stale .git (its HEAD an older commit, the files the newer ones: "+changes"
    then says so, and the environment's "tree", working_tree(), names the files); callers there
    may pass the commit in CUFLASH_BENCH_COMMIT."""
    if os.environ.get("CUFLASH_BENCH_COMMIT"):
        return os.environ["CUFLASH_BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        if out.returncode != 0 or not out.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO_ROOT,
                               capture_output=True, timeout=30).returncode == 1
        return out.stdout.strip() + ("+changes" if dirty else "")
    except Exception:
        return "unknown"


def working_tree():
    """The git tree hash of the files as they are (tracked and untracked, .gitignore applied),
    through a scratch index: the commit whose tree it is (`git log --format='%h %T'`) is what
    ran, whatever HEAD says. None where git cannot tell."""
    try:
        with tempfile.TemporaryDirectory() as scratch:
            env = dict(os.environ, GIT_INDEX_FILE=os.path.join(scratch, "index"))
            for args in (["add", "-A"], ["write-tree"]):
                out = subprocess.run(["git", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                                     text=True, timeout=60)
                if out.returncode != 0:
                    return None
            return out.stdout.strip() or None
    except Exception:
        return None


def environment():
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": str(cudnn) if cudnn else "none",
            "date": datetime.date.today().isoformat(), "commit": git_commit(), "tree": working_tree()}


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def output_path(out_dir, env, tag):
    stem = f"{slug(env['gpu'])}-{env['date']}" + (f"-{slug(tag)}" if tag else "")
    return Path(out_dir) / f"{stem}.json"


def env_line(env):
    commit = env["commit"][:12] + ("+changes" if env["commit"].endswith("+changes") else "")
    if env.get("tree"):  # the files that ran, whatever the commit says (working_tree)
        commit += f" (tree {env['tree'][:12]})"
    runs = f", the median of {len(env['combined_from'])} runs" if env.get("combined_from") else ""
    return (f"{env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
            f"{env['date']}, commit {commit}{runs}")


def fmt_tflops(x):
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def cell(row, field):
    """A table cell: the value, '-' (not run), 'skip' or 'err' (see the notes under the table)."""
    if row is None:
        return "-"
    if "error" in row:
        return "skip" if row["error"].startswith("skipped") else "err"
    return fmt_tflops(row[field]) if row.get(field) is not None else "-"


def fmt_ratio(ours, peer):
    return f"{ours / peer:.2f}x" if ours is not None and peer else "-"


def impls_in(rows):
    """The implementations of rows: ALL_IMPLS' in its order, then the variants, sorted."""
    impls = [i for i in ALL_IMPLS if any(r["impl"] == i for r in rows)]
    return impls + sorted({r["impl"] for r in rows} - set(impls))


def table_for(rows, dtype, layout):
    """One markdown table for (dtype, layout): ours, peers, and our ratio to each peer."""
    rows = [r for r in rows if r["dtype"] == dtype and r["layout"] == layout]
    impls = impls_in(rows)
    peers = [i for i in impls if i != OURS]
    by_key = {(r["head_dim"], r["causal"], r["seqlen_q"], r["impl"]): r for r in rows}
    keys = sorted({(r["head_dim"], r["causal"], r["seqlen_q"]) for r in rows})

    def get(key, impl, field):
        r = by_key.get((*key, impl))
        return None if r is None or "error" in r else r.get(field)

    head = ["D", "causal", "N"]
    for impl in impls:
        head += [f"{SHORT_NAMES.get(impl, impl)} fwd", f"{SHORT_NAMES.get(impl, impl)} bwd"]
    if OURS in impls:
        for p in peers:
            head += [f"vs {SHORT_NAMES.get(p, p)} fwd", f"vs {SHORT_NAMES.get(p, p)} bwd"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        cells = [str(key[0]), "yes" if key[1] else "no", str(key[2])]
        for impl in impls:
            cells += [cell(by_key.get((*key, impl)), f) for f in ("fwd_tflops", "bwd_tflops")]
        if OURS in impls:
            for p in peers:
                for f in ("fwd_tflops", "bwd_tflops"):
                    cells.append(fmt_ratio(get(key, OURS, f), get(key, p, f)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + error_notes(rows)


def layout_ratio_table(rows, dtype):
    """Each implementation's TFLOP/s in every other layout over its TFLOP/s in LAYOUTS[0], from the
    rows timed with both in the same interleaved rounds (measure_configuration)."""
    rows = [r for r in rows if r["dtype"] == dtype and r.get("layouts_interleaved") and "error" not in r]
    base, others = LAYOUTS[0], [l for l in LAYOUTS[1:] if any(r["layout"] == l for r in rows)]
    impls = impls_in(rows)
    by_key = {(r["head_dim"], r["causal"], r["seqlen_q"], r["impl"], r["layout"]): r for r in rows}
    keys = sorted({(r["head_dim"], r["causal"], r["seqlen_q"]) for r in rows})
    head = ["D", "causal", "N"] + [f"{SHORT_NAMES.get(i, i)} {layout} {f}" for i in impls for layout in others
                                   for f in ("fwd", "bwd")]
    lines = [markdown_header(head)]
    for key in keys:
        cells = [str(key[0]), "yes" if key[1] else "no", str(key[2])]
        for impl in impls:
            b = by_key.get((*key, impl, base))
            for layout in others:
                r = by_key.get((*key, impl, layout))
                for f in ("fwd_tflops", "bwd_tflops"):
                    cells.append(fmt_ratio(r and r.get(f), b and b.get(f)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def error_notes(rows):
    counts = {}
    for r in rows:
        if "error" in r:
            counts[(r["impl"], r["error"])] = counts.get((r["impl"], r["error"]), 0) + 1
    if not counts:
        return ""
    notes = [f"- `{impl}` ({n}x): {err}" for (impl, err), n in sorted(counts.items())]
    return "\nNot timed ('err' and 'skip' cells):\n\n" + "\n".join(notes) + "\n"


def memory_table(rows):
    impls = [i for i in ALL_IMPLS if any(r["impl"] == i for r in rows)]
    seqlens = sorted({r["seqlen"] for r in rows})
    by_key = {(r["seqlen"], r["impl"]): r for r in rows}
    r0 = rows[0]
    head = ["N"] + [f"{SHORT_NAMES.get(i, i)} {what}" for i in impls
                    for what in ("fwd MiB", "fwd+bwd MiB", "KiB/token")]
    lines = [f"Peak memory beyond the inputs, {r0['dtype']}, B={r0['batch']}, H={r0['heads']}, "
             f"D={r0['head_dim']}, non-causal (fwd: inference, no autograd graph).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in seqlens:
        cells = [str(n)]
        for impl in impls:
            r = by_key.get((n, impl))
            if r is None or "error" in r:
                cells += ["-" if r is None else ("skip" if r["error"].startswith("skipped") else "err")]
                cells += ["", ""]
            else:
                cells += [f"{r['fwd_peak_mib']:.0f}", f"{r['fwdbwd_peak_mib']:.0f}",
                          f"{r['per_token_kib']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + error_notes(rows)


def render_markdown(results):
    env = results["env"]
    rows = results.get("rows", [])
    state = "\n".join(line for line in (gpu_state_line(rows), clocks_line(rows)) if line)
    parts = [f"# Attention benchmark\n\n{env_line(env)}\n" + (f"\n{state}" if state else "")]
    groups = sorted({(r["dtype"], r["layout"]) for r in rows},
                    key=lambda g: (g[0] != "bfloat16", g[0], g[1] != "bhnd", g[1]))
    for dtype, layout in groups:
        parts.append(f"## {dtype}, layout {layout}: TFLOP/s (fwd, bwd) and ours / peer\n\n"
                     "Standard table: batch * seqlen = 16384, heads = 2048 / D. "
                     "FLOPs fwd 4*B*H*N*N*D (halved when causal), bwd 2.5x fwd.\n\n"
                     + table_for(rows, dtype, layout))
    for dtype in sorted({r["dtype"] for r in rows if r.get("layouts_interleaved")}):
        parts.append(f"## {dtype}: each layout's TFLOP/s over {LAYOUTS[0]}'s, timed in the same rounds\n\n"
                     + layout_ratio_table(rows, dtype))
    if results.get("memory_rows"):
        parts.append("## Peak memory against seqlen\n\n" + memory_table(results["memory_rows"]))
    return "\n".join(parts)


ROW_KEY = ("impl", "dtype", "layout", "batch", "heads", "seqlen_q", "seqlen_k", "head_dim", "causal")


def merge_rows(old, new):
    """old's rows that new does not re-measure, then new's."""
    fresh = {tuple(r[k] for k in ROW_KEY) for r in new}
    return [r for r in old if tuple(r.get(k) for k in ROW_KEY) not in fresh] + list(new)


# What a results file's header states for all its rows: rows kept from an earlier run (--merge,
# or the section a run does not produce) must share it.
RUN_KEYS = ("gpu", "torch", "cuda", "cudnn", "commit", "tree")


def same_run_environment(a, b):
    return all(a.get(k) == b.get(k) for k in RUN_KEYS)


def write_results(path, env, rows=None, memory_rows=None, merge=False):
    """Writes the JSON (replacing the sections this run produced, keeping the others; with
    merge, keeping also the rows of other configurations) and the .md."""
    results = {}
    if path.exists():
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            results = {}
    keeps_old = bool(results.get("rows")) and (rows is None or merge) or \
        bool(results.get("memory_rows")) and memory_rows is None
    if keeps_old and results.get("env") and not same_run_environment(results["env"], env):
        raise SystemExit(f"{path} holds results of another tree or environment ({env_line(results['env'])}); this "
                         f"run is {env_line(env)}: its rows would appear under this run's header. Write them "
                         "under another --tag, or move the file away.")
    results["env"] = env
    if rows is not None:
        results["rows"] = merge_rows(results.get("rows", []), rows) if merge else rows
    if memory_rows is not None:
        results["memory_rows"] = memory_rows
    results.setdefault("rows", [])
    results = {"env": results["env"], "rows": results["rows"],
               **({"memory_rows": results["memory_rows"]} if results.get("memory_rows") else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    markdown = render_markdown(results)
    path.with_suffix(".md").write_text(markdown)
    return markdown


# ---------------------------------------------------------------------------------------------
# Command line.

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time cuflash_attn.flash_attention against torch SDPA backends "
                    "(flash, cudnn, efficient, math) on one CUDA GPU, in one process, on the "
                    "same inputs. Protocol: /work/shared/PERF.md.")
    p.add_argument("--dtypes", type=lambda s: parse_list(s, parse_dtype), default=None,
                   help="comma list of bf16,fp16,fp32,fp64 (default bf16)")
    p.add_argument("--head-dims", type=lambda s: parse_list(s, int), default=None,
                   help=f"comma list (default {','.join(map(str, HEAD_DIMS))}); heads = {HIDDEN} // D")
    p.add_argument("--seqlens", type=lambda s: parse_list(s, int), default=None,
                   help=f"comma list (default {','.join(map(str, SEQLENS))}); "
                        f"batch = {TOTAL_TOKENS} // seqlen")
    p.add_argument("--causal", choices=("both", "true", "false"), default="both")
    p.add_argument("--impls", type=parse_impls, default=None,
                   help=f"comma subset of {','.join(ALL_IMPLS)} (default all; "
                        f"with --memory: {','.join(MEMORY_IMPLS)}); {OURS}[_nondet]@VAR=value[+VAR=value] "
                        f"adds our kernels under run-time switches (e.g. {OURS}@CUFLASH_SM90=tma,features), "
                        f"compared with {OURS} in the same run")
    p.add_argument("--layouts", type=parse_list, default=["bhnd"],
                   help="comma list of bhnd,bnhd (bnhd: [B,N,H,D] storage passed as "
                        ".transpose(1,2) views to every impl); default bhnd. With both, each "
                        "configuration's layouts are timed in the same interleaved rounds, and the "
                        "markdown adds a table of bnhd / bhnd")
    p.add_argument("--quick", action="store_true",
                   help="small subset: D=64,128, seqlen 1024,4096, bf16 (explicit options win)")
    p.add_argument("--memory", action="store_true",
                   help=f"instead of timing: peak memory of fwd and fwd+bwd for seqlen "
                        f"{MEMORY_SEQLENS[0]}..{MEMORY_SEQLENS[-1]}, {MEMORY_DTYPE}, B={MEMORY_BATCH}, "
                        f"H={MEMORY_HEADS}, D={MEMORY_HEAD_DIM}; stored under 'memory_rows' of the same JSON")
    p.add_argument("--memory-math-max", type=int, default=16384, metavar="N",
                   help="--memory: skip sdpa_math above this seqlen (default 16384; "
                        "out of memory is caught and recorded)")
    p.add_argument("--skip-math-above", type=int, default=4096, metavar="N",
                   help="skip sdpa_math when seqlen > N, recording an error row (default 4096; "
                        "-1: never skip)")
    add_timing_arguments(p)
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help="output directory (default benchmarks/results)")
    p.add_argument("--tag", default=None,
                   help="suffix for the output file name: <gpu>-<date>-<tag>.json")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows already in the output file that this run does not re-measure "
                        "(several runs, e.g. one per dtype, into one <gpu>-<date>.json); without it "
                        "the run's rows replace the file's")
    args = p.parse_args(argv)

    args.impls = args.impls or list(MEMORY_IMPLS if args.memory else ALL_IMPLS)
    unknown = {name for name in args.impls if name not in ALL_IMPLS
               and not (split_variant(name)[0] in (OURS, OURS_NONDET) and split_variant(name)[1])}
    bad_layouts = set(args.layouts) - set(LAYOUTS)
    if unknown:
        p.error(f"unknown impls {sorted(unknown)}; choose from {', '.join(ALL_IMPLS)}")
    if bad_layouts:
        p.error(f"unknown layouts {sorted(bad_layouts)}; choose from {', '.join(LAYOUTS)}")
    args.dtypes = args.dtypes or list(QUICK_DTYPES if args.quick else ("bf16",))
    args.head_dims = args.head_dims or list(QUICK_HEAD_DIMS if args.quick else HEAD_DIMS)
    args.seqlens = args.seqlens or list(QUICK_SEQLENS if args.quick else SEQLENS)
    args.causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    check_timing_arguments(p, args)
    if args.skip_math_above is not None and args.skip_math_above < 0:
        args.skip_math_above = None
    for d in args.head_dims:
        if not 0 < d <= 256 or HIDDEN % d:
            p.error(f"head_dim {d}: must divide {HIDDEN} and be at most 256")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        log("error: no CUDA device: this benchmark needs a GPU")
        return 1
    torch.manual_seed(0)
    variants = [name for name in args.impls if name not in ALL_IMPLS]
    impls = load_impls([name for name in ALL_IMPLS if name in args.impls] + variants)
    env = environment()
    log(env_line(env))
    path = output_path(args.out, env, args.tag)
    if args.memory:
        markdown = write_results(path, env, memory_rows=run_memory(args, impls))
    else:
        timer = make_timer(args.warmup_ms, args.rep_ms)
        markdown = write_results(path, env, rows=run_standard(args, impls, timer), merge=args.merge)
    print(markdown)
    log(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
