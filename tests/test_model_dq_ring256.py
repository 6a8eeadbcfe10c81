"""benchmarks/model_dq_ring256.py (no GPU): the head-dim-256 dQ box ring's protocol holds under
random interleavings with one drain warp and with two, and the model catches the two-drain
hand-over's wait or its read wait left out."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import model_dq_ring256 as model  # noqa: E402


@pytest.mark.parametrize("drains", [1, 2])
def test_protocol_holds(drains):
    assert sum(model.run(seed, drains) for seed in range(300)) > 0


@pytest.mark.parametrize("left_out", ["handoff_wait", "handoff_reads"])
def test_each_part_of_the_hand_over_is_needed(left_out):
    with pytest.raises(model.ProtocolError):
        for seed in range(300):
            model.run(seed, 2, **{left_out: False})


def test_main_reports(capsys):
    assert model.main(["--drains", "2", "--runs", "20"]) == 0
    assert "no deadlock" in capsys.readouterr().out
