"""Shared fixtures: each test gets its own $VOLEMBED_HOME (the session shares one export cache, $VOLEMBED_CACHE) and
never reaches the Hub; `launched` fakes a Modal launch."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One $VOLEMBED_CACHE for the session: the local engine's OpenVINO export (5-20 s) is made once, not per test.
    Exports are keyed by the weights they came from, so sharing them shares no test's state."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_cache: Path) -> None:
    monkeypatch.setenv("VOLEMBED_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VOLEMBED_CACHE", str(shared_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def write_spec(tmp_path: Path):
    """Write a spec file from text and return its path."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> tuple[Path, Path]:
    """(spec, VOLEMBED_HOME) of one small finished local run with a stale embeddings folder (`after_run.py`)."""
    from tests.after_run import make_finished

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VOLEMBED_CACHE", str(shared_cache))
        return make_finished(tmp_path_factory.mktemp("after"))


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Runs that reached launch (faked), with Modal credentials set in the environment."""
    from volembed_runner.backends.modal import launch

    calls: list[str] = []

    def fake_run(plan, *, until, detach, on_upload=None, prices=None, on_progress=None) -> launch.Launched:
        calls.append(plan.name)
        return launch.Launched(plan.name, "ap-1", None, detached=False, summary={"ok": True, "stages": []})

    monkeypatch.setattr(launch, "run", fake_run)
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")  # credentials are checked before the estimate
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    return calls
