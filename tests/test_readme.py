"""README.md's speed table is the one benchmarks/readme_table.py generates from the committed
results. CPU only."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import readme_table  # noqa: E402


def test_readme_speed_table_is_current():
    assert readme_table.main(["--check"]) == 0, "run python3 benchmarks/readme_table.py"


def test_check_notices_a_stale_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{readme_table.BEGIN}\nold table\n{readme_table.END}\n\nrest\n")
    assert readme_table.main(["--check", "--readme", str(readme)]) == 1
    assert readme_table.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and "| D | causal | N |" in text and text.endswith("\nrest\n")
    assert readme_table.main(["--check", "--readme", str(readme)]) == 0
