"""The README's promises: its library example runs, and CI runs its test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()
bundled = pytest.mark.skipif(not (REPO / "index_data" / "shapes-mini.pt").exists(), reason="bundled model not built")


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command() -> None:
    test_command = code_blocks("bash")[1].strip()
    assert "pytest" in test_command
    assert test_command in (REPO / ".ci" / "run").read_text()


@bundled
def test_library_example_runs(tmp_path: Path) -> None:
    example = code_blocks("python")[0].replace("/tmp/mmsearch-library-demo", str(tmp_path / "idx"))
    result = subprocess.run([sys.executable, "-c", example], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("added ")
    assert "blue_star" in lines[1]  # the best image for "a blue star" is a blue star
    assert lines[4].startswith("caption:") and "red circle" in lines[4]
    assert lines[-1] == "(2, 64) float32"
