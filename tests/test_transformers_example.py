"""examples/transformers_sdpa.py: a HuggingFace transformers model trained with torch's SDPA and
with cuflash_attn.enable() gives the same losses and gradients, every call on the kernels."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cuflash_attn
from conftest import DEVICES

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "transformers_sdpa.py"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_transformers_example(device, dtype):
    # The cuflash_attn this test imported, not another one installed elsewhere.
    package_root = str(Path(cuflash_attn.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(EXAMPLE), "--device", device, "--dtype", dtype],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fallback none" in result.stdout and result.stdout.rstrip().endswith("OK"), result.stdout
