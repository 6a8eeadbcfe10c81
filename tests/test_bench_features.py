"""benchmarks/bench_features.py's peers, CPU only: FlexAttention's call for a feature set (flex_call,
its eager reference here) computes the attention our op computes on the same arguments (op_call's),
so that --flex times the same work; the peers' table marks the calls a peer does not take."""
import sys
from pathlib import Path

import pytest
import torch

import cuflash_attn  # noqa: F401 (registers torch.ops.cuflash_attn)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_features  # noqa: E402


@pytest.mark.filterwarnings("ignore")  # FlexAttention's eager mode warns that it is slow
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("feature", bench_features.PEER_FEATURES[bench_features.FLEX])
def test_flex_computes_our_attention(feature, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 72, 16) for _ in range(3))  # 8 query heads: GQA's group of 8 on 1
    q, k, v, kw = bench_features.op_call(q, k, v, causal, bench_features.FEATURES[feature])
    ours, _ = torch.ops.cuflash_attn.fwd(q, k, v, None, causal, False, **kw)
    theirs = bench_features.flex_call(q, k, v, causal, kw, compiled=False)()
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=2e-5)


def test_the_window_hides_keys_in_both_calls():
    """The window's feature set hides keys (else the test above would not tell its masks apart)."""
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    _, _, _, kw = bench_features.op_call(q, k, v, False, bench_features.FEATURES["window"])
    assert (kw["window_left"], kw["window_right"]) == (8, 8)
    windowed = bench_features.flex_call(q, k, v, False, kw, compiled=False)()
    whole = bench_features.flex_call(q, k, v, False, {}, compiled=False)()
    assert not torch.allclose(windowed, whole)


def test_peer_cells():
    flex = bench_features.FLEX
    assert bench_features.peer_cell("dropout", flex, None) == "-"
    assert bench_features.peer_cell("softcap", flex, None) == "error"
    assert bench_features.peer_cell("softcap", flex, 412.4) == "412"


@pytest.mark.filterwarnings("ignore")
def test_flex_peer_step_runs(monkeypatch):
    """peer_step's FlexAttention call, with the eager reference in place of the compiled one: the
    forward runs; the forward + backward's inputs require gradients (FlexAttention refuses exactly
    that on the CPU, its backward being GPU-only)."""
    from torch.nn.attention.flex_attention import flex_attention
    monkeypatch.setattr(bench_features, "_compiled_flex", flex_attention)
    q, k, v = (torch.randn(1, 8, 40, 16) for _ in range(3))
    softcap = bench_features.FEATURES["softcap"]
    assert bench_features.peer_step(q, k, v, True, softcap, False, bench_features.FLEX)().shape == q.shape
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        bench_features.peer_step(q, k, v, True, softcap, True, bench_features.FLEX)()


def test_variant_switches():
    assert bench_features.variant_switches("") == {"CUFLASH_SM90": ""}
    assert bench_features.variant_switches("0") == {"CUFLASH_SM90": "0"}
    assert bench_features.variant_switches("tma,bwd") == {"CUFLASH_SM90": "tma,bwd"}
    assert bench_features.variant_switches("+CUFLASH_FWD_TILE=wide") == {"CUFLASH_SM90": "",
                                                                         "CUFLASH_FWD_TILE": "wide"}


@pytest.mark.parametrize("feature", ["attn_mask", "bool_mask", "key_padding"])
def test_mask_features_run_ours(feature):
    """The three masks (float and bool per query, bool key padding hiding the last N/8 keys) are the
    op's attn_mask as described, and our op takes them (on the CPU, against attention with the
    mask's keys left out for key padding)."""
    q, k, v = (torch.randn(2, 4, 64, 16) for _ in range(3))
    q2, k2, v2, kw = bench_features.op_call(q, k, v, False, bench_features.FEATURES[feature])
    mask = kw["attn_mask"]
    expected = {"attn_mask": (torch.float32, (2, 1, 64, 64)), "bool_mask": (torch.bool, (2, 1, 64, 64)),
                "key_padding": (torch.bool, (2, 1, 1, 64))}[feature]
    assert (mask.dtype, tuple(mask.shape)) == expected
    out, _ = torch.ops.cuflash_attn.fwd(q2, k2, v2, None, False, False, **kw)
    assert out.isfinite().all()
    if feature == "key_padding":
        assert mask[..., :56].all() and not mask[..., 56:].any()
        unpadded, _ = torch.ops.cuflash_attn.fwd(q, k[:, :, :56], v[:, :, :56], None, False, False)
        torch.testing.assert_close(out, unpadded, atol=1e-5, rtol=1e-5)


def test_ncu_cases_calls_what_the_benchmarks_define():
    """scripts/ncu_cases.py runs only on a GPU under ncu; a helper renamed here (op_options became
    op_call) broke it unseen. Every bench_features.X and bench.X it names must exist."""
    import ast

    import bench_attention

    source = Path(__file__).resolve().parent.parent / "scripts" / "ncu_cases.py"
    modules = {"bench_features": bench_features, "bench": bench_attention}
    named = {(node.value.id, node.attr) for node in ast.walk(ast.parse(source.read_text()))
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules}
    assert ("bench_features", "op_call") in named
    missing = sorted(f"{m}.{attr}" for m, attr in named if not hasattr(modules[m], attr))
    assert not missing, missing
