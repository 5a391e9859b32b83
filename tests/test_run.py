"""What `volembed-run SPEC` does before spending money on Modal: estimate, refuse over max_cost, ask, launch."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tests.paid_run import SPEC
from volembed_runner import run as running
from volembed_runner.cli import app
from volembed_runner.errors import Declined

runner = CliRunner()



def spec_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "paid.yaml"
    path.write_text(SPEC + extra)
    return path


def test_run_over_max_cost_is_refused_and_nothing_starts(tmp_path: Path, launched: list[str]) -> None:
    result = runner.invoke(app, [str(spec_file(tmp_path)), "--set", "compute.max_cost=0.01"])
    assert result.exit_code == 4
    assert "exceeds compute.max_cost $0.01" in result.output and "--yes" in result.output
    assert launched == []


def test_run_of_unknown_cost_is_refused_under_max_cost(tmp_path: Path, launched: list[str]) -> None:
    path = tmp_path / "unknown.yaml"
    path.write_text(SPEC.replace("  num_rows: 1000000\n  num_bytes: 2000000000\n", ""))
    result = runner.invoke(app, [str(path), "--set", "compute.max_cost=100"])
    assert result.exit_code == 4 and "estimated cost unknown exceeds compute.max_cost" in result.output
    assert launched == []


def test_yes_overrides_max_cost(tmp_path: Path, launched: list[str]) -> None:
    result = runner.invoke(app, [str(spec_file(tmp_path)), "--set", "compute.max_cost=0.01", "--yes"])
    assert result.exit_code == 0, result.output
    assert launched == ["paid"]


def test_a_terminal_is_asked_before_spending(tmp_path: Path, launched: list[str], monkeypatch) -> None:
    from volembed_runner import estimate
    from volembed_runner.loading import load_spec
    from volembed_runner.plan import make_plan
    from volembed_runner.ui.console import ask

    path = spec_file(tmp_path)
    plan = make_plan(load_spec(path), path)
    est = estimate.estimate(plan)
    console = Console(file=io.StringIO(), force_terminal=False)
    asked: list[str] = []
    monkeypatch.setattr(console, "input", lambda prompt, **kw: asked.append(prompt) or "n")
    with pytest.raises(Declined, match="not started"):
        running.check_spend(plan, est, yes=False, confirm=lambda e: ask(console, "Start? [y/N] "))
    assert asked == ["Start? [y/N] "]
    monkeypatch.setattr(console, "input", lambda prompt, **kw: "y")
    running.check_spend(plan, est, yes=False, confirm=lambda e: ask(console, "Start? [y/N] "))


def test_local_runs_never_ask_or_estimate(tmp_path: Path, monkeypatch) -> None:
    from volembed_runner import estimate

    monkeypatch.setattr(estimate, "estimate", lambda *a, **k: pytest.fail("a local run must not estimate"))
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n')
    path = tmp_path / "local.yaml"
    path.write_text(SPEC.replace("backend: modal", "backend: local").replace(
        "  hf: org/data\n", "  files: [d.jsonl]\n").replace("BAAI/bge-base-en-v1.5",
                                                            "sentence-transformers/all-MiniLM-L6-v2"))
    result = runner.invoke(app, [str(path), "--until", "chunk", "--set", "compute.max_cost=0.0001",
                                 "--set", "chunking.size=128"])
    assert result.exit_code == 0, result.output
