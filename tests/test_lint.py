"""The tree passes ruff's pyflakes rules (unused imports and variables, undefined names) and has no syntax errors
(pyproject.toml's [tool.ruff]); ruff comes with the test extras."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "bench", "tools", "examples"],
                       cwd=REPO, capture_output=True, text=True)
    assert "No module named ruff" not in r.stderr, "ruff is missing: pip install -e '.[test]'"
    assert r.returncode == 0, r.stdout + r.stderr
