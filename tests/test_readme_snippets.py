"""The README's DuckDB and `datasets` snippets, extracted from README.md and run as printed on the local demo's
output (the demo spec itself, cut to its first documents so the run stays small)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from volembed_runner.cli import app

from .conftest import REPO


def snippets() -> dict[str, str]:
    """The README's python blocks, by the library each imports (duckdb, datasets)."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), flags=re.S)
    found = {}
    for block in blocks:
        for name in ("duckdb", "datasets"):
            if re.search(rf"^(import|from) {name}\b", block, flags=re.M):
                found[name] = block
    return found


@pytest.mark.slow
def test_the_readme_snippets_run_as_printed_on_the_demo_output(tmp_path: Path, monkeypatch, capsys) -> None:
    code = snippets()
    assert set(code) == {"duckdb", "datasets"}
    monkeypatch.chdir(REPO)  # the snippets name pipelines/local-demo.yaml, as a user in the checkout would
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # volembed-run
    result = CliRunner().invoke(app, ["pipelines/local-demo.yaml", "--set", "dataset.limit=30",
                                      "--set", "chunking.workers=1"])
    assert result.exit_code == 0, result.output

    duck: dict = {}
    exec(compile(code["duckdb"], "README.md (duckdb)", "exec"), duck)
    rows = duck["hits"].fetchall()
    assert len(rows) == 5 and rows[0][2] == pytest.approx(1.0, abs=1e-5) and rows[1][2] < rows[0][2] + 1e-6

    hf: dict = {}
    exec(compile(code["datasets"], "README.md (datasets)", "exec"), hf)
    assert hf["matrix"].shape == (len(hf["vectors"]), 384) and hf["matrix"].dtype == np.float32
    assert hf["scores"].max() == pytest.approx(1.0, abs=1e-5)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-5].startswith("1.000") and len(printed[-5].split(maxsplit=1)) == 2  # score, then the title
