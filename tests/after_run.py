"""One small finished local run for the after-run tests (`test_results.py`, `test_publish.py`): made once per
session by the `finished_run` fixture (conftest.py), copied by each test that uses it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from volembed_runner.cli import app
from volembed_runner.loading import load_spec
from volembed_runner.plan import Plan, make_plan

SPEC = """\
version: 1
name: after
backend: local
volume: aftervol
dataset:
  files: [docs.jsonl]
  keep_columns: [title]
  shard_rows: 5
chunking: {size: 32, overlap: 4, workers: 1}
embedding: {model: sentence-transformers/all-MiniLM-L6-v2, precision: fp32}
output: {include_text: false}
"""
DOCS = [
    "Rivers carry water from mountains to the sea.",
    "A library lends books, and a museum keeps objects of art and history for people to see.",
    "Quantum theory describes the behaviour of matter and energy at the smallest scales " * 3,
    "Zürich is a city in Switzerland; its café culture is old.",
    "ok",
    "",
    "Gardens need water, light and patience; a harbour needs ships and a breakwater against the waves.",
] * 3  # 21 documents → 5 shards of at most 5


def make_finished(folder: Path) -> tuple[Path, Path]:
    """(spec, VOLEMBED_HOME) of a run with `embedding.normalize=false`, then of the spec as written (which reuses the
    chunks and leaves the unnormalized vectors stale)."""
    with (folder / "docs.jsonl").open("w", encoding="utf-8") as fh:
        for i, text in enumerate(DOCS):
            fh.write(json.dumps({"text": text, "title": f"doc {i}"}) + "\n")
    spec = folder / "spec.yaml"
    spec.write_text(SPEC)
    home = folder / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VOLEMBED_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        for args in (["--set", "embedding.normalize=false"], []):
            result = CliRunner().invoke(app, [str(spec), *args])
            assert result.exit_code == 0, result.output
    return spec, home


def own_copy(finished_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Plan]:
    """A test's own copy of the session's finished run, made its VOLEMBED_HOME and current folder: (spec, plan)."""
    spec, home = finished_run
    shutil.copytree(home, tmp_path / "home")
    monkeypatch.setenv("VOLEMBED_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return spec, make_plan(load_spec(spec), spec)
