"""The shell scripts parse (bash -n), so that a syntax slip shows in CI rather than in a device
call, where it costs a machine's start; and the README names the scripts that exist. CPU only."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh")) + [ROOT / ".ci" / "run"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bash_n_catches_a_broken_script(tmp_path):
    broken = tmp_path / "broken.sh"
    broken.write_text("if true; then\n  echo unclosed\n")
    assert subprocess.run(["bash", "-n", str(broken)], capture_output=True).returncode != 0


def test_readme_names_existing_scripts():
    named = set(re.findall(r"scripts/[\w.-]+\.(?:sh|py)", (ROOT / "README.md").read_text()))
    assert named, "the README names no script"
    missing = sorted(name for name in named if not (ROOT / name).exists())
    assert not missing, missing
