"""A run's Modal Volume read (and cleaned) from this machine through the SDK, for `files`, `fetch`, `report`, `gc`.

`ModalVolumeFiles` is `results.VolumeFiles` over `modal.Volume` 1.6's client-side calls (`listdir`, `read_file`,
`remove_file(recursive=True)`; modal 1.6.4 `volume.py`), so the after-run verbs share one code path with the local
volume. Paths are relative to the Volume's root, as `store.py` lays them out under `/vol` in the containers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from volembed_runner.backends.modal.launch import _modal_errors, require_credentials
from volembed_runner.errors import BackendError
from volembed_runner.plan import Plan
from volembed_runner.results import Entry


class ModalVolumeFiles:
    """`VolumeFiles` over a `modal.Volume` (or a stand-in with its `listdir`, `read_file`, `remove_file`)."""

    def __init__(self, volume: Any, name: str) -> None:
        self.volume = volume
        self.where = f"modal volume {name}"

    def list(self, path: str, *, recursive: bool = True) -> list[Entry]:
        from modal.exception import NotFoundError
        from modal.types import FileEntryType

        with _modal_errors(f"list {self.where}:/{path}"):
            try:
                found = self.volume.listdir(path, recursive=recursive)
            except (NotFoundError, FileNotFoundError):
                return []
        return [Entry(e.path.lstrip("/"), int(e.size), e.type == FileEntryType.DIRECTORY, float(e.mtime))
                for e in found]

    def read(self, path: str) -> bytes | None:
        from modal.exception import NotFoundError

        with _modal_errors(f"read {self.where}:/{path}"):
            try:
                return b"".join(self.volume.read_file(path))
            except (NotFoundError, FileNotFoundError):
                return None

    def download(self, path: str, dest: Path, on_bytes: Callable[[int], None]) -> None:
        with _modal_errors(f"download {self.where}:/{path}"), open(dest, "wb") as fh:
            for block in self.volume.read_file(path):
                fh.write(block)
                on_bytes(len(block))

    def remove(self, path: str) -> None:
        with _modal_errors(f"remove {self.where}:/{path}"):
            self.volume.remove_file(path, recursive=True)


def open_volume(plan: Plan) -> ModalVolumeFiles:
    """The plan's Volume, looked up by name (never created: a missing Volume means the run never started)."""
    require_credentials()
    import modal
    from modal.exception import NotFoundError

    volume = modal.Volume.from_name(plan.volume)
    with _modal_errors(f"find modal volume {plan.volume}"):
        try:
            volume.hydrate()
        except NotFoundError:
            raise BackendError(f"no Modal volume {plan.volume}: {plan.name} has not run on Modal (or the volume "
                               "name changed)") from None
    return ModalVolumeFiles(volume, plan.volume)


def lease_store(plan: Plan) -> Any:
    """The run's lease in the workspace's lease Dict, as the generated app's orchestrator holds it."""
    import modal

    from volembed_runner.backends.modal import render
    from volembed_runner.backends.modal.runtime import DictLeaseStore

    return DictLeaseStore(modal.Dict.from_name(render.LEASE_DICT, create_if_missing=True),
                          f"{plan.volume}/{plan.name}")
