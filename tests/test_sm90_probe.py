"""The Hopper building blocks (csrc/cuda/sm90/wgmma.cuh: swizzled shared-memory descriptors,
wgmma) checked on their own by tests/sm90/wgmma_probe.cu, before any kernel of the Hopper path
uses them: compiled for sm_90a everywhere nvcc is (ptxas must not serialize the wgmma), run where
a compute capability 9.x GPU is present."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        pytest.skip("nvcc not found")
    exe = tmp_path_factory.mktemp("sm90") / "wgmma_probe"
    build = subprocess.run([nvcc, "-std=c++17", "-O2", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
                            "-I", str(HERE.parent / "csrc"), str(HERE / "sm90" / "wgmma_probe.cu"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return exe, build.stderr


def test_compiles_without_serialized_wgmma(probe):
    _, ptxas_log = probe
    assert "wgmma" not in ptxas_log.lower() or "serializ" not in ptxas_log.lower(), ptxas_log


@pytest.mark.skipif(not SM90, reason="needs a compute capability 9.x GPU")
def test_wgmma_matches_double_product(probe):
    exe, _ = probe
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    print(run.stdout)  # one line per check (pytest -s, or -rA, shows them)
    assert run.returncode == 0, run.stdout + run.stderr
