"""README.md's speed table is the one benchmarks/readme_table.py generates from the committed
results. CPU only."""
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_nondet_columns(tmp_path):
    """Rows of ours with deterministic=False (bench_attention's cuflash_attn_nondet) add its
    backward and its ratios to the peers; without them the table has no such columns."""
    env = {"gpu": "G", "torch": "t", "cuda": "c", "cudnn": "d", "date": "x", "commit": "abc"}

    def row(impl, fwd, bwd):
        return {"impl": impl, "dtype": "bfloat16", "layout": "bhnd", "head_dim": 64, "causal": False,
                "seqlen_q": 1024, "fwd_tflops": fwd, "bwd_tflops": bwd}
    rows = [row("cuflash_attn", 300.0, 200.0), row("sdpa_flash", 250.0, 220.0), row("sdpa_cudnn", 400.0, 320.0)]
    plain = readme_table.render({"env": env, "rows": rows}, tmp_path / "r.json", tmp_path / "README.md")
    assert "nondet" not in plain
    text = readme_table.render({"env": env, "rows": rows + [row("cuflash_attn_nondet", 301.0, 240.0)]},
                               tmp_path / "r.json", tmp_path / "README.md")
    assert "| 64 | no | 1024 | 300 | 200 | 1.20x | 0.91x | 0.75x | 0.62x | 240 | 1.09x | 0.75x |" in text, text
    assert "cuDNN 0.75-0.75x forward, 0.62-0.62x backward (0.75-0.75x nondet)" in text.replace("\n", " "), text


def test_newest_untagged_run_is_taken(tmp_path):
    """The table comes from the newest untagged run (<gpu>-<date>.json); a tagged one, newer or
    not, is an A/B run or a check of a few rows (bench_attention.py --tag) and is passed over."""
    import json

    def results(date):
        rows = [{"impl": "cuflash_attn", "dtype": "bfloat16", "layout": "bhnd", "head_dim": 64, "causal": False,
                 "seqlen_q": 1024, "fwd_tflops": 1.0, "bwd_tflops": 1.0}]
        return {"env": {"gpu": "NVIDIA H100 80GB HBM3", "date": date}, "rows": rows}
    (tmp_path / "nvidia-h100-80gb-hbm3-2026-01-01.json").write_text(json.dumps(results("2026-01-01")))
    (tmp_path / "nvidia-h100-80gb-hbm3-2026-01-02-ab.json").write_text(json.dumps(results("2026-01-02")))
    newest = readme_table.newest_results(tmp_path, "H100")
    assert newest.name == "nvidia-h100-80gb-hbm3-2026-01-01.json"
    (tmp_path / "nvidia-h100-80gb-hbm3-2026-01-03.json").write_text(json.dumps(results("2026-01-03")))
    assert readme_table.newest_results(tmp_path, "H100").name == "nvidia-h100-80gb-hbm3-2026-01-03.json"


def test_a_stale_device_checkout_is_named_by_its_tree():
    """On the device the copy's .git may be an older commit ("+changes"): the recorded tree of the
    files names the commit that ran; a tree of no commit leaves the label as it was."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()
    head, tree = git("rev-parse", "HEAD"), git("rev-parse", "HEAD^{tree}")
    if not head or not tree:
        pytest.skip("not a git checkout")
    old = "0123456789abcdef0123456789abcdef01234567+changes"
    assert readme_table.run_commit({"commit": old, "tree": tree}) == head[:12]
    assert readme_table.run_commit({"commit": old, "tree": "f" * 40}) == "0123456789ab+changes"
    assert readme_table.run_commit({"commit": head}) == head[:12]
