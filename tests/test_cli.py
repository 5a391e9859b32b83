"""The command line's small promises: --version, one-line errors for a folder, options that do not apply to a
local spec, and specs the catalog knows cannot work (Matryoshka dimensions)."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from volembed_runner.cli import app

from .conftest import REPO

runner = CliRunner()

LOCAL = """\
version: 1
name: demo
volume: vol
dataset:
  files: [docs.jsonl]
chunking: {size: 64, overlap: 8}
embedding:
  model: sentence-transformers/all-MiniLM-L6-v2
"""


@pytest.fixture
def local_spec(write_spec, tmp_path: Path):
    """A valid local spec (with its one-document source) from text, by default LOCAL."""
    (tmp_path / "docs.jsonl").write_text('{"text": "a river"}\n', encoding="utf-8")
    return lambda text=LOCAL: write_spec(text)


def test_version_prints_the_installed_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"volembed-run {version('volembed-runner')}"


@pytest.mark.parametrize("command", [[], ["validate"], ["plan"], ["--dry-run"]])
def test_a_folder_as_the_spec_is_one_line_naming_a_spec_in_it(command: list[str]) -> None:
    folder = REPO / "pipelines"
    args = [command[0], str(folder)] if command and not command[0].startswith("-") else [str(folder), *command]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output and "Usage" not in result.output
    (line,) = result.output.splitlines()
    assert "is a folder, not a spec file" in line and "pipelines/" in line and ".yaml" in line


def test_stop_on_a_local_spec_says_how_a_local_run_stops_without_asking_modal(local_spec, monkeypatch) -> None:
    for name in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        monkeypatch.delenv(name, raising=False)
    result = runner.invoke(app, ["stop", str(local_spec())])
    assert result.exit_code == 2 and "credentials" not in result.output.lower()
    (line,) = result.output.splitlines()
    assert "backend: local" in line and "Ctrl-C" in line


def test_detach_on_a_local_spec_is_an_error_not_ignored(local_spec) -> None:
    result = runner.invoke(app, [str(local_spec()), "--detach"])
    assert result.exit_code == 2
    (line,) = result.output.splitlines()
    assert line.startswith("error: --detach: only for backend: modal")


def test_dimensions_on_a_model_without_matryoshka_training_is_refused(local_spec) -> None:
    result = runner.invoke(app, ["validate", str(local_spec(LOCAL + "  dimensions: 128\n"))])
    assert result.exit_code == 2
    (line,) = result.output.splitlines()
    assert "embedding.dimensions" in line and "not trained for Matryoshka" in line
    assert "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2" in line


@pytest.mark.parametrize(("dims", "ok"), [(256, True), (64, True), (32, False), (1024, False)])
def test_dimensions_on_a_matryoshka_model_stay_within_what_it_was_trained_for(local_spec, dims: int, ok: bool) -> None:
    spec = LOCAL.replace("sentence-transformers/all-MiniLM-L6-v2", "nomic-ai/nomic-embed-text-v1.5")
    result = runner.invoke(app, ["validate", str(local_spec(spec + f"  dimensions: {dims}\n"))])
    assert (result.exit_code == 0) is ok, result.output
    if not ok:
        assert "trained for 64 to 768 dimensions" in result.output and "https://" in result.output
