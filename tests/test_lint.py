"""The tree passes ruff's pyflakes rules (unused imports and variables, undefined names) and has no syntax errors
(pyproject.toml's [tool.ruff]); ruff comes with the test extras."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "bench", "study", "tools", "examples"],
                       cwd=REPO, capture_output=True, text=True)
    assert "No module named ruff" not in r.stderr, "ruff is missing: pip install -e '.[test]'"
    assert r.returncode == 0, r.stdout + r.stderr


def test_nothing_cites_a_file_a_clone_does_not_have():
    """Code, recipes and docs cite the paper (Wu, Xia, Wang, NeurIPS 2020: section, figure, table) or the project's own
    docs, not the notes beside the development checkout (../shared/), which a user's clone does not have."""
    notes = "PAPER" + ".md"  # spelled so that this file does not cite it
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout (an unpacked archive): read the folders that ship
        tracked = [str(p.relative_to(REPO)) for d in ("src", "tests", "bench", "study", "tools", "recipes", "docs") for p in (REPO / d).rglob("*")]
        tracked.append("README.md")
    bad = [name for name in tracked if name.endswith((".py", ".md", ".yaml", ".yml")) and (REPO / name).is_file()
           and notes in (REPO / name).read_text(errors="replace")]
    assert bad == []
