"""Before a paid Modal run: credentials first, the estimate's one line always, then `[y/N]` on a terminal."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.paid_run import SPEC
from volembed_runner import cli
from volembed_runner.backends.modal import launch
from volembed_runner.cli import app

runner = CliRunner()



@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "paid.yaml"
    path.write_text(SPEC)
    return path


def on_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_on_terminal", lambda: True)


def test_terminal_question_shows_y_n_and_declining_exits_5(spec: Path, launched: list[str], monkeypatch) -> None:
    on_terminal(monkeypatch)
    result = runner.invoke(app, [str(spec)], input="n\n")
    assert result.exit_code == 5, result.output
    assert "Start paid on Modal? [y/N]" in result.output  # the brackets survive rich
    assert "error: paid not started (answered no)" in result.output
    assert launched == []


def test_empty_answer_is_no(spec: Path, launched: list[str], monkeypatch) -> None:
    on_terminal(monkeypatch)
    result = runner.invoke(app, [str(spec)], input="\n")
    assert result.exit_code == 5 and launched == []


def test_yes_answer_starts_the_run_after_the_estimate(spec: Path, launched: list[str], monkeypatch) -> None:
    on_terminal(monkeypatch)
    result = runner.invoke(app, [str(spec)], input="y\n")
    assert result.exit_code == 0, result.output
    assert launched == ["paid"]
    assert result.output.index("estimate: paid on Modal:") < result.output.index("[y/N]")


@pytest.mark.parametrize("args", [["--yes"], []], ids=["yes", "piped"])
def test_estimate_line_is_printed_without_a_question(spec: Path, launched: list[str], args: list[str]) -> None:
    result = runner.invoke(app, [str(spec), *args])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("estimate: paid on Modal:"))
    assert "$" in line and "10 × A10 at once" in line, line
    assert "[y/N]" not in result.output
    assert launched == ["paid"]


def test_unknown_cost_says_so_and_why(tmp_path: Path, launched: list[str]) -> None:
    path = tmp_path / "unknown.yaml"
    path.write_text(SPEC.replace("  num_rows: 1000000\n  num_bytes: 2000000000\n", ""))
    result = runner.invoke(app, [str(path), "--yes"])
    assert result.exit_code == 0, result.output
    assert "estimate: paid on Modal: unknown, unknown" in result.output
    assert "unknown: " in result.output


def test_credentials_are_checked_before_the_question(spec: Path, launched: list[str], monkeypatch) -> None:
    on_terminal(monkeypatch)
    monkeypatch.setattr(launch, "has_credentials", lambda: False)
    monkeypatch.setattr(cli, "ask", lambda *a: pytest.fail("asked before checking credentials"))
    result = runner.invoke(app, [str(spec)], input="y\n")
    assert result.exit_code == 4
    assert result.output.startswith("error: no Modal credentials") and "modal setup" in result.output
    assert launched == []
