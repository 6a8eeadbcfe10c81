"""benchmarks/bench_attention.py's harness, CPU only: implementation variants under run-time
switches (cuflash_attn@VAR=value) parse, set their environment for their own measurement only,
and unknown names are refused."""
import os
import sys
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
