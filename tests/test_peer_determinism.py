"""benchmarks/peer_determinism.py, CPU only: a backward whose gradients differ between runs is
reported as differing (by how much), a reproducible one as bitwise, and the table names each
implementation, one that cannot load included."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import peer_determinism  # noqa: E402


def inputs():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 16, 8, generator=generator, dtype=torch.float64) for _ in range(4)]


def test_a_varying_backward_differs():
    """Gradients that vary from run to run (q perturbed by a factor that changes each call)."""
    calls = []

    def varying(q, k, v):
        calls.append(1)
        return torch.nn.functional.scaled_dot_product_attention(q * (1 + 1e-6 * len(calls)), k, v)

    found = peer_determinism.reproducibility(varying, *inputs(), repeats=3)
    assert not found["dq"][0] and found["dq"][1] > 0
    assert len(calls) == 3


def test_a_reproducible_backward_is_bitwise():
    found = peer_determinism.reproducibility(torch.nn.functional.scaled_dot_product_attention, *inputs(), repeats=3)
    assert found == {"dq": (True, 0.0), "dk": (True, 0.0), "dv": (True, 0.0)}


def test_table_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "table.md"
    peer_determinism.main(["--device", "cpu", "--shapes", "1,2,32,16", "--repeats", "2", "--dtype", "fp32",
                           "--impls", "sdpa_math,no_such_impl", "--out", str(out)])
    table = out.read_text()
    assert "| (1, 2, 32, 16) | sdpa_math | bitwise | bitwise | bitwise |" in table
    assert "| (1, 2, 32, 16) | no_such_impl | import failed" in table


@pytest.mark.parametrize("argv", [["--repeats", "1"], ["--shapes", "1,2,3"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        peer_determinism.main(["--device", "cpu", *argv])


def test_bits_compare_nans_alike_and_zeros_apart():
    nan = torch.tensor([float("nan"), 0.0], dtype=torch.bfloat16)
    assert torch.equal(peer_determinism.bits(nan), peer_determinism.bits(nan.clone()))
    assert not torch.equal(peer_determinism.bits(torch.tensor([0.0])), peer_determinism.bits(torch.tensor([-0.0])))
