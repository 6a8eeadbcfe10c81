"""benchmarks/bench_attention.py's harness, CPU only: implementation variants under run-time
switches (cuflash_attn@VAR=value) parse, set their environment for their own measurement only,
and unknown names are refused; a configuration's implementations are timed in interleaved rounds
(a rotating order), each row the median of its rounds."""
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_attention as bench  # noqa: E402


def test_variant_names_parse():
    assert bench.split_variant("cuflash_attn") == ("cuflash_attn", {})
    assert bench.split_variant("cuflash_attn@CUFLASH_SM90=tma+CUFLASH_BWD_DQ=atomic") == (
        "cuflash_attn", {"CUFLASH_SM90": "tma", "CUFLASH_BWD_DQ": "atomic"})


def test_variant_environment_is_restored(monkeypatch):
    monkeypatch.setenv("CUFLASH_SM90", "0")
    monkeypatch.delenv("CUFLASH_BWD_DQ", raising=False)
    with bench.environment_of("cuflash_attn@CUFLASH_SM90=tma+CUFLASH_BWD_DQ=atomic"):
        assert os.environ["CUFLASH_SM90"] == "tma" and os.environ["CUFLASH_BWD_DQ"] == "atomic"
    assert os.environ["CUFLASH_SM90"] == "0" and "CUFLASH_BWD_DQ" not in os.environ


@pytest.mark.parametrize("name", ["cuflash_attn@", "cuflash_attn@NOEQUALS", "sdpa_flash@X=1", "nope"])
def test_unknown_impls_are_refused(name):
    with pytest.raises(SystemExit):
        bench.parse_args(["--impls", f"cuflash_attn,{name}"])


def test_variants_are_accepted():
    args = bench.parse_args(["--impls", "cuflash_attn,cuflash_attn@CUFLASH_SM90=tma", "--quick"])
    assert args.impls == ["cuflash_attn", "cuflash_attn@CUFLASH_SM90=tma"]
    args = bench.parse_args(["--impls", "cuflash_attn_nondet@CUFLASH_BWD_FUSED_TILE=wide", "--quick"])
    assert args.impls == ["cuflash_attn_nondet@CUFLASH_BWD_FUSED_TILE=wide"]


def test_variant_values_may_hold_commas():
    args = bench.parse_args(["--impls", "cuflash_attn@CUFLASH_SM90=tma,features+CUFLASH_DEBUG=0,sdpa_cudnn,"
                                        "cuflash_attn@CUFLASH_SM90=0", "--quick"])
    assert args.impls == ["cuflash_attn@CUFLASH_SM90=tma,features+CUFLASH_DEBUG=0", "sdpa_cudnn",
                          "cuflash_attn@CUFLASH_SM90=0"]
    assert bench.split_variant(args.impls[0])[1] == {"CUFLASH_SM90": "tma,features", "CUFLASH_DEBUG": "0"}


def test_rounds_interleave_in_a_rotating_order_and_keep_each_timing():
    calls = []

    def step(name, kind):
        return lambda: calls.append((name, kind))

    steps = {name: (step(name, "fwd"), step(name, "fwdbwd")) for name in ("a", "b", "c")}
    times = iter(range(1, 100))

    def timer(fn):
        fn()
        return float(next(times))

    samples = bench.interleaved_timings(steps, timer, rounds=3)
    order = [name for name, kind in calls if kind == "fwd"]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(kind == "fwdbwd" and name == fwd_name for (fwd_name, _), (name, kind)
               in zip(calls[::2], calls[1::2]))
    assert samples["a"] == ([1.0, 11.0, 15.0], [2.0, 12.0, 16.0])
    assert samples["c"] == ([5.0, 9.0, 13.0], [6.0, 10.0, 14.0])


def test_a_failing_implementation_is_dropped_from_later_rounds():
    ran = []

    def failing():
        raise RuntimeError("launch failed\nmore")

    steps = {"ok": (lambda: ran.append("ok"), lambda: None), "bad": (failing, failing)}

    def timer(fn):
        fn()
        return 1.0

    samples = bench.interleaved_timings(steps, timer, rounds=3)
    assert samples["bad"] == "launch failed"
    assert samples["ok"] == ([1.0] * 3, [1.0] * 3) and ran == ["ok"] * 3


def test_the_backward_is_forward_and_backward_less_the_training_forward():
    # The training forward (inputs that require grad) of 4 ms, the inference forward of 2:
    # forward+backward 10 ms leaves a backward of 6, per round too.
    row = bench.timed_fields([2.0, 2.0, 2.0], [10.0, 10.0, 11.0], (1, 1, 1000, 64), False, [4.0, 4.0, 5.0])
    assert (row["fwd_ms"], row["bwd_ms"], row["train_fwd_ms"]) == (2.0, 6.0, 4.0)
    assert row["bwd_ms_rounds"] == [6.0, 6.0, 6.0]


def test_long_steps_are_timed_over_at_least_min_repeats():
    calls = []

    def bench_over(rep):  # a step of 16 ms: its median whatever rep is
        calls.append(rep)
        return 16.0

    assert bench.at_least_repeats(bench_over, 40) == 16.0 and calls == [40, bench.MIN_REPEATS * 16.0]
    calls.clear()
    assert bench.at_least_repeats(lambda rep: calls.append(rep) or 0.5, 40) == 0.5 and calls == [40]


def test_a_row_is_the_median_of_its_rounds():
    # B=1, H=1, N=1000, D=64 non-causal: 4 * 1000^2 * 64 FLOPs forward, 2.5 times that backward
    row = bench.timed_fields([1.0, 9.0, 2.0], [3.0, 30.0, 5.0], (1, 1, 1000, 64), False)
    assert (row["fwd_ms"], row["fwdbwd_ms"], row["bwd_ms"]) == (2.0, 5.0, 3.0)
    assert row["fwd_tflops"] == pytest.approx(4 * 1000**2 * 64 / 2e-3 / 1e12)
    assert row["bwd_tflops"] == pytest.approx(2.5 * 4 * 1000**2 * 64 / 3e-3 / 1e12)
    assert row["fwd_ms_rounds"] == [1.0, 9.0, 2.0]


def test_rounds_must_be_positive():
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])
    assert bench.parse_args([]).rounds == 3


def test_a_configuration_times_every_implementation_under_its_own_switches(monkeypatch):
    """measure_configuration with the CUDA parts stubbed: a variant's switch is set while it is
    prepared and while it is timed, never for the others; failures, skips and implementations
    that did not load come back as error rows, in the order given."""
    monkeypatch.delenv("CUFLASH_BWD_DQ", raising=False)
    monkeypatch.setattr(bench, "make_inputs", lambda *a: ("q", "k", "v", "dout"))
    monkeypatch.setattr(bench, "probe", lambda fn, *a: fn())
    monkeypatch.setattr(bench, "peak_mib", lambda step: 1.0)
    monkeypatch.setattr(bench, "free_memory", lambda: None)
    monkeypatch.setattr(bench, "fwd_step", lambda fn, *inputs: fn)
    monkeypatch.setattr(bench, "fwdbwd_step", lambda fn, *inputs: fn)
    seen = []

    def make(causal):
        def fn(*args):
            seen.append(os.environ.get("CUFLASH_BWD_DQ"))
        return fn

    def broken(causal):
        raise RuntimeError("no kernel")

    impls = {"cuflash_attn": make, "cuflash_attn@CUFLASH_BWD_DQ=ordered": make, "sdpa_flash": broken,
             "sdpa_efficient": "import failed: x", "sdpa_math": make}
    timings = iter(float(i) for i in range(1, 100))

    def timer(step):
        step()
        return next(timings)

    rows = bench.measure_configuration(impls, (1, 2, 8192, 64), False, bench.torch.bfloat16, "bhnd", timer,
                                       rounds=2, skip_math_above=4096)
    assert [r["impl"] for r in rows] == list(impls)
    assert rows[2]["error"] == "no kernel" and rows[3]["error"] == "import failed: x"
    assert rows[4]["error"].startswith("skipped")
    assert "error" not in rows[0] and len(rows[0]["fwd_ms_rounds"]) == 2 and rows[0]["peak_mib"] == 1.0
    # probe once each, then three steps a round each (forward, forward+backward, training forward),
    # two rounds; the variant's calls see its switch
    assert seen.count("ordered") == 1 + 3 * 2 and seen.count(None) == 1 + 3 * 2
    assert "CUFLASH_BWD_DQ" not in os.environ


def test_runs_combine_into_the_median_of_all_their_rounds(tmp_path):
    import combine_runs

    def row(impl, fwd, fwdbwd, **extra):
        r = {"impl": impl, "dtype": "bfloat16", "layout": "bhnd", "batch": 1, "heads": 1, "seqlen_q": 1000,
             "seqlen_k": 1000, "head_dim": 64, "causal": False, "peak_mib": extra.pop("peak", 1.0)}
        if fwd is None:
            return {**r, "error": "no kernel"}
        return {**r, "fwd_ms": fwd[0], "fwdbwd_ms": fwdbwd[0], "fwd_ms_rounds": fwd, "fwdbwd_ms_rounds": fwdbwd}

    env = {"gpu": "NVIDIA H200", "torch": "2", "cuda": "13.0", "cudnn": "9", "date": "2026-12-04", "commit": "abc"}
    runs = [{"env": env, "rows": [row("ours", [1.0, 2.0, 9.0], [3.0, 4.0, 30.0]), row("peer", None, None)]},
            {"env": env, "rows": [row("ours", [3.0, 4.0, 5.0], [6.0, 7.0, 8.0], peak=2.0), row("peer", [1.0], [2.0])]}]
    paths = []
    for i, run in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run))
    assert combine_runs.main([str(tmp_path / "both.json")] + [str(p) for p in paths]) == 0
    both = json.loads((tmp_path / "both.json").read_text())
    ours, peer = both["rows"]
    assert (ours["fwd_ms"], ours["fwdbwd_ms"], ours["bwd_ms"]) == (3.5, 6.5, 3.0)  # medians of six rounds
    assert ours["runs"] == 2 and ours["peak_mib"] == 2.0 and len(ours["fwd_ms_rounds"]) == 6
    assert peer["error"] == "no kernel"  # one run failed: the row says so
    assert both["env"]["combined_from"] == ["run0.json", "run1.json"]
    assert "the median of 2 runs" in (tmp_path / "both.md").read_text()


def test_inputs_that_cannot_be_made_give_every_row_the_error(monkeypatch):
    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 9 GiB")

    monkeypatch.setattr(bench, "make_inputs", out_of_memory)
    monkeypatch.setattr(bench, "free_memory", lambda: None)
    rows = bench.measure_configuration({"cuflash_attn": lambda causal: None, "sdpa_flash": "import failed: x"},
                                       (1, 2, 8192, 64), True, bench.torch.float16, "bnhd", None, 3, None)
    assert [r["impl"] for r in rows] == ["cuflash_attn", "sdpa_flash"]
    assert all(r["error"] == "inputs: CUDA out of memory. Tried to allocate 9 GiB" for r in rows)
    assert rows[0]["layout"] == "bnhd" and rows[0]["dtype"] == "float16" and rows[0]["causal"] is True


def test_rounds_take_any_number_of_steps_under_a_given_environment(monkeypatch):
    """bench_features.py's use: one step a cell, cells named (feature, variant), the variant's
    CUFLASH_SM90 set by the environment function while its step is timed."""
    monkeypatch.delenv("CUFLASH_SM90", raising=False)
    seen = []
    cells = {(feature, variant): (lambda: seen.append(os.environ.get("CUFLASH_SM90")),)
             for feature in ("plain", "softcap") for variant in ("", "0")}

    def timer(fn):
        fn()
        return 2.0

    samples = bench.interleaved_timings(cells, timer, 2,
                                        environment=lambda cell: bench.switches_set({"CUFLASH_SM90": cell[1]}))
    assert all(got == ([2.0, 2.0],) for got in samples.values())
    assert sorted(seen) == ["", "", "", "", "0", "0", "0", "0"] and "CUFLASH_SM90" not in os.environ


def test_kernel_breakdown_report_per_call(capsys):
    """kernel_breakdown.report (bench_features.py --breakdown's too): kernel time per call, the
    largest first, with its share and launches a call, under the call's name."""
    import kernel_breakdown
    totals = {"void cuflash::d_kernel(cuflash::P)": [2, 50.0], "void cuflash::sm90::k<int, 64>(cuflash::P)": [4, 200.0]}
    kernel_breakdown.report("softcap", totals, 2, "forward")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "  softcap: 125.0 us of kernels a forward"
    assert lines[1].split()[:3] == ["100.0", "us", "80.0%"] and lines[1].endswith("x2  k<int, 64>"), lines
    assert lines[2].split()[:3] == ["25.0", "us", "20.0%"] and lines[2].endswith("x1  d_kernel"), lines


def test_varlen_bench_lengths_and_variant_names(monkeypatch):
    """bench_varlen.py's sets of lengths (LxN: N sequences of L tokens), and its cells' names,
    which set their CUFLASH_SM90 value (commas included) through environment_of."""
    import bench_varlen
    assert bench_varlen.parse_lengths("2048x2;5,7x3") == [[2048, 2048], [5, 7, 7, 7]]
    monkeypatch.delenv("CUFLASH_SM90", raising=False)
    with bench.environment_of("@CUFLASH_SM90=tma,kvcache,varlen"):
        assert os.environ["CUFLASH_SM90"] == "tma,kvcache,varlen"
    with bench.environment_of("defaults"):
        assert "CUFLASH_SM90" not in os.environ


def test_layouts_are_timed_in_the_same_rounds_and_their_ratio_tabled(monkeypatch):
    """With --layouts bhnd,bnhd every (implementation, layout) pair shares one ring of rounds (a
    slow spell of the machine lands on both layouts, not on one), the rows say so, and the
    markdown gives bnhd's TFLOP/s over bhnd's for each implementation."""
    made = []
    monkeypatch.setattr(bench, "make_inputs", lambda *a: made.append(a[-1]) or (a[-1],) * 4)
    monkeypatch.setattr(bench, "probe", lambda fn, *a: None)
    monkeypatch.setattr(bench, "peak_mib", lambda step: 1.0)
    monkeypatch.setattr(bench, "free_memory", lambda: None)
    monkeypatch.setattr(bench, "fwd_step", lambda fn, q, *rest: ("fwd", q))
    monkeypatch.setattr(bench, "fwdbwd_step", lambda fn, q, *rest: ("fwdbwd", q))
    monkeypatch.setattr(bench, "training_fwd_step", lambda fn, q, *rest: ("train_fwd", q))
    impls = {"cuflash_attn": lambda causal: None, "sdpa_cudnn": lambda causal: None}
    order = []
    # forward 1 ms in bhnd and 1.25 ms in bnhd; forward+backward 4 and 4.5 ms, less the training
    # forward's 2 and 2.25 (backward 2 and 2.25)
    ms = {("fwd", "bhnd"): 1.0, ("fwd", "bnhd"): 1.25, ("fwdbwd", "bhnd"): 4.0, ("fwdbwd", "bnhd"): 4.5,
          ("train_fwd", "bhnd"): 2.0, ("train_fwd", "bnhd"): 2.25}

    def timer(step):
        order.append(step[1])
        return ms[step]

    rows = bench.measure_configuration(impls, (1, 2, 1024, 64), False, bench.torch.bfloat16, ["bhnd", "bnhd"],
                                       timer, rounds=2, skip_math_above=None)
    assert made == ["bhnd", "bnhd"]
    assert [(r["impl"], r["layout"]) for r in rows] == [("cuflash_attn", "bhnd"), ("sdpa_cudnn", "bhnd"),
                                                        ("cuflash_attn", "bnhd"), ("sdpa_cudnn", "bnhd")]
    assert all(r["layouts_interleaved"] == ["bhnd", "bnhd"] for r in rows)
    # one ring of four cells: both layouts in every round (separate rings would time bhnd twice first)
    assert order[:12] == ["bhnd"] * 6 + ["bnhd"] * 6
    assert len(order) == 2 * 4 * 3
    assert rows[0]["bwd_ms"] == 2.0 and rows[0]["train_fwd_ms"] == 2.0 and rows[2]["bwd_ms"] == 2.25
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2", "cuda": "13.0", "cudnn": "9", "date": "2026-12-05",
           "commit": "abc"}
    markdown = bench.render_markdown({"env": env, "rows": rows})
    assert "## bfloat16: each layout's TFLOP/s over bhnd's, timed in the same rounds" in markdown
    assert "| 64 | no | 1024 | 0.80x | 0.89x | 0.80x | 0.89x |" in markdown  # 1/1.25, 2/2.25
    # rows of one layout only (separate runs) get no ratio table
    single = bench.measure_configuration(impls, (1, 2, 1024, 64), False, bench.torch.bfloat16, "bnhd",
                                         timer, rounds=1, skip_math_above=None)
    assert "layouts_interleaved" not in single[0]
    assert "timed in the same rounds" not in bench.render_markdown({"env": env, "rows": single})


def test_rows_of_another_tree_are_not_kept_under_this_runs_header(tmp_path):
    """--merge (or the section a run does not produce) keeps earlier rows under the new run's
    header only where the header holds for them: the same tree, torch and GPU."""
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2", "cuda": "13.0", "cudnn": "9", "date": "2026-12-07",
           "commit": "abc", "tree": "t1"}
    row = {"impl": "cuflash_attn", "dtype": "bfloat16", "layout": "bhnd", "batch": 1, "heads": 1, "seqlen_q": 1000,
           "seqlen_k": 1000, "head_dim": 64, "causal": False, "error": "no kernel"}
    path = tmp_path / "run.json"
    bench.write_results(path, env, rows=[row])
    bench.write_results(path, env, rows=[{**row, "dtype": "float16"}], merge=True)  # same tree: merged
    assert len(json.loads(path.read_text())["rows"]) == 2
    other = {**env, "commit": "def", "tree": "t2"}
    with pytest.raises(SystemExit, match="another tree or environment"):
        bench.write_results(path, other, rows=[{**row, "dtype": "float32"}], merge=True)
    with pytest.raises(SystemExit, match="another tree or environment"):
        bench.write_results(path, other, memory_rows=[{"impl": "x"}])  # would keep the rows
    bench.write_results(path, other, rows=[row])  # replaces every row: allowed
    assert json.loads(path.read_text())["env"]["tree"] == "t2"
    assert "(tree t2)" in bench.env_line(other)


def test_gpu_state_parses_nvidia_smi_and_names_the_reasons():
    state = bench.parse_gpu_state("1755, 2619, 512.34, 61, 0x0000000000000004")
    assert state == {"sm_clock_mhz": 1755.0, "mem_clock_mhz": 2619.0, "power_w": 512.34, "temperature_c": 61.0,
                     "reasons": ["sw_power_cap"]}
    assert bench.parse_gpu_state("1980, 2619, [N/A], 40, 0x0")["power_w"] is None
    assert bench.parse_gpu_state("1980, 2619, 40") is None  # not the fields asked for
    assert bench.clock_event_reasons(0x1 | 0x40 | 0x1000) == ["idle", "hw_thermal", "0x1000"]


def test_the_markdown_names_the_configurations_a_slowdown_was_active_after():
    env = {"gpu": "g", "torch": "2", "cuda": "13.0", "cudnn": "9", "date": "2026-12-07", "commit": "abc"}
    base = {"dtype": "bfloat16", "layout": "bhnd", "batch": 1, "heads": 1, "head_dim": 64, "causal": False,
            "fwd_tflops": 1.0, "bwd_tflops": 1.0}
    cool = {"sm_clock_mhz": 1980.0, "mem_clock_mhz": 2619.0, "power_w": 400.0, "temperature_c": 50.0, "reasons": []}
    capped = {**cool, "sm_clock_mhz": 1600.0, "power_w": 700.0, "reasons": ["sw_power_cap"]}
    rows = [{**base, "impl": impl, "seqlen_q": n, "seqlen_k": n, "gpu_state": state}
            for n, state in ((1024, cool), (4096, capped)) for impl in ("cuflash_attn", "sdpa_cudnn")]
    text = bench.render_markdown({"env": env, "rows": rows})
    assert "2 configurations): 1600-1980 MHz SM, 2619 MHz memory, 400-700 W, 50 C." in text
    assert "sw_power_cap after 1 (bfloat16 D=64 N=4096)" in text
    text = bench.render_markdown({"env": env, "rows": [r for r in rows if r["seqlen_q"] == 1024]})
    assert "No power or thermal slowdown reason was active." in text
    no_state = [{k: v for k, v in r.items() if k != "gpu_state"} for r in rows]
    assert "GPU state" not in bench.render_markdown({"env": env, "rows": no_state})


def test_each_timed_row_keeps_the_gpu_state_after_its_rounds(monkeypatch):
    monkeypatch.setattr(bench, "make_inputs", lambda *a, **k: None)
    monkeypatch.setattr(bench, "prepare_row", lambda name, *a: ({"impl": name}, (lambda: 0, lambda: 0, lambda: 0)))
    monkeypatch.setattr(bench, "free_memory", lambda: None)
    monkeypatch.setattr(bench, "gpu_state", lambda: {"sm_clock_mhz": 1980.0})
    rows = bench.measure_configuration({"a": None, "b": None}, (1, 1, 8, 64), False, None, "bhnd",
                                       timer=lambda fn: 1.0, rounds=1, skip_math_above=None)
    assert [r["gpu_state"] for r in rows] == [{"sm_clock_mhz": 1980.0}] * 2


def test_the_clock_sampler_files_each_reading_under_the_label_being_timed():
    readings = iter([(1980.0, 400.0, 0x0), (1500.0, 700.0, 0x4)] * 10000)
    sampler = bench.ClockSampler(lambda: next(readings), interval_s=0.001)
    try:
        time.sleep(0.02)  # no label: nothing sampled
        assert sampler.take() == {}
        with sampler.timing("a"):
            time.sleep(0.05)
        got = sampler.take()
        assert list(got) == ["a"] and got["a"]["samples"] >= 2
        assert got["a"]["sm_clock_mhz_min"] == 1500.0 and 1500.0 < got["a"]["sm_clock_mhz"] < 1980.0
        assert 0 < got["a"]["slowdown_share"] < 1 and got["a"]["reasons"] == ["sw_power_cap"]
        assert sampler.take() == {}  # taken: afresh
    finally:
        sampler.close()
    assert bench.summarize_clocks([(1000.0, None, 0x1)]) == {
        "samples": 1, "sm_clock_mhz": 1000.0, "sm_clock_mhz_min": 1000.0, "power_w": None, "slowdown_share": 0.0,
        "reasons": []}  # idle is not a slowdown


class _FakeSampler:
    """ClockSampler's interface: timing(label) records the labels; take() gives one reading each."""

    def __init__(self):
        self.labels = []

    @contextlib.contextmanager
    def timing(self, label):
        self.labels.append(label)
        yield

    def take(self):
        return {label: {"sm_clock_mhz": 1700.0 + i, "sm_clock_mhz_min": 1600.0, "power_w": 650.0,
                        "slowdown_share": 0.5, "samples": 3} for i, label in enumerate(dict.fromkeys(self.labels))}


def test_each_row_keeps_the_clocks_sampled_while_its_steps_ran(monkeypatch):
    monkeypatch.setattr(bench, "make_inputs", lambda *a, **k: None)
    monkeypatch.setattr(bench, "prepare_row", lambda name, *a: ({"impl": name}, (lambda: 0, lambda: 0, lambda: 0)))
    monkeypatch.setattr(bench, "free_memory", lambda: None)
    monkeypatch.setattr(bench, "gpu_state", lambda: None)
    sampler = _FakeSampler()
    rows = bench.measure_configuration({"a": None, "b": None}, (1, 1, 8, 64), False, None, "bhnd",
                                       timer=lambda fn: 1.0, rounds=2, skip_math_above=None, sampler=sampler)
    assert sampler.labels == [("a", "bhnd"), ("b", "bhnd"), ("b", "bhnd"), ("a", "bhnd")]  # rotating rounds
    assert [r["gpu_clocks"]["sm_clock_mhz"] for r in rows] == [1700.0, 1701.0]


def test_the_markdown_gives_each_implementations_clock_while_it_ran():
    env = {"gpu": "g", "torch": "2", "cuda": "13.0", "cudnn": "9", "date": "2026-12-07", "commit": "abc"}
    base = {"dtype": "bfloat16", "layout": "bhnd", "batch": 1, "heads": 1, "head_dim": 64, "causal": False,
            "fwd_tflops": 1.0, "bwd_tflops": 1.0}
    rows = [{**base, "impl": impl, "seqlen_q": n, "seqlen_k": n,
             "gpu_clocks": {"sm_clock_mhz": clock, "sm_clock_mhz_min": clock - 100, "power_w": 600.0,
                            "slowdown_share": share, "samples": 5}}
            for n in (1024, 4096) for impl, clock, share in (("cuflash_attn", 1700.0 + n / 1024, 0.5),
                                                             ("sdpa_cudnn", 1900.0, 0.0))]
    text = bench.render_markdown({"env": env, "rows": rows})
    assert ("SM clock while each implementation's steps ran (NVML every 10 ms, the mean over 2 configurations): "
            "cuflash_attn 1702 MHz (lowest 1601), 600 W, 50% of samples slowed; sdpa_cudnn 1900 MHz (lowest "
            "1800), 600 W, 0% of samples slowed.") in text
    no_clocks = [{k: v for k, v in r.items() if k != "gpu_clocks"} for r in rows]
    assert "SM clock while" not in bench.render_markdown({"env": env, "rows": no_clocks})
