"""benchmarks/model_window_tiles.py (no GPU): the visible share of a tiling, exact on cases small
enough to count by hand, and the window ceilings benchmarks/NOTES.md quotes."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import model_window_tiles as model  # noqa: E402


def test_no_mask_computes_only_visible_pairs():
    assert model.visible_share(256, -1, -1, 128, 128) == 1.0


def test_causal_one_tile_counts_its_triangle():
    # One 4 x 4 tile under a causal mask: 1 + 2 + 3 + 4 visible of 16.
    assert model.visible_share(4, -1, 0, 4, 4) == pytest.approx(10 / 16)


def test_a_window_tile_count_by_hand():
    # N = 8, window (1, 1), 4 x 4 tiles: rows 0-3 reach keys 0-4 (blocks 0 and 1), rows 4-7 keys 3-7
    # (blocks 0 and 1): 64 computed; visible 2 + 3 * 6 + 2 = 22.
    assert model.visible_share(8, 1, 1, 4, 4) == pytest.approx(22 / 64)


def test_the_ceilings_benchmarks_notes_quote():
    full, causal = model.ceilings(2048, 128, 128)
    assert (round(full, 2), round(causal, 2)) == (0.81, 0.71)
    full, causal = model.ceilings(8192, 128, 128)
    assert (round(full, 2), round(causal, 2)) == (0.95, 0.90)
    smaller = model.ceilings(2048, 64, 64)
    assert smaller[0] > 0.85 and smaller[1] > 0.8  # 64 x 64 blocks raise both


def test_main_prints_a_row_per_tile_and_length(capsys):
    assert model.main(["--seqlens", "1024", "--tiles", "128x128,64x64"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 128x128", "| 64x64"))]
    assert len(rows) == 2 and all("| 1024 |" in row for row in rows), rows
