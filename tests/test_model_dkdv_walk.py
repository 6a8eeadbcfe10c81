"""benchmarks/model_dkdv_walk.py, the dK/dV walk's model (no GPU): efficiencies within (0, 1], the
grouped heads' causal tail it explains, and the splits that shorten it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import model_dkdv_walk as model  # noqa: E402


def test_grouped_heads_end_late_and_splits_shorten_the_tail():
    for d in (64, 128):
        ratios = [ideal / end for ideal, end, _ in (model.efficiency(d, 2048, 8, s) for s in (1, 2, 4, 8))]
        assert all(0 < r <= 1 for r in ratios), ratios
        assert ratios == sorted(ratios), ratios
        assert ratios[0] < 0.8 < ratios[-1], ratios


def test_one_query_head_a_tile_fills_the_sms():
    ideal, end, longest = model.efficiency(128, 2048, 1, 1)
    assert 0.9 < ideal / end <= 1
    assert longest == 2048 // 64  # the first key block's: every 64-query block


def test_table(capsys):
    assert model.main(["--head-dims", "64", "--seqlens", "1024", "--splits", "1,2,3"]) == 0
    out = capsys.readouterr().out
    assert "| 64 | 1024 | 8 | 2 |" in out and "| 64 | 1024 | 8 | 3 |" not in out  # 3 does not divide 8
