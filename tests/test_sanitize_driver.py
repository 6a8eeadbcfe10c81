"""scripts/sanitize.sh's driver (tests/sanitize_driver.py) on the CPU kernels: every case it
lists runs or skips cleanly (the 16-bit ones are CUDA's), so that a GPU session spends no device
time on a broken driver."""
import subprocess
import sys
from pathlib import Path

DRIVER = Path(__file__).resolve().parent / "sanitize_driver.py"


def test_driver_cases_pass_on_cpu():
    run = subprocess.run([sys.executable, str(DRIVER), "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summary = [line for line in run.stdout.splitlines() if line.startswith("sanitize_driver:")]
    assert summary and ", 0 failed," in summary[-1], run.stdout[-2000:]

