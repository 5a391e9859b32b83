"""Run a Plan on Modal through the SDK: check, upload local files, render the app, run it; read its status; stop it.

Thin over tested code: the app is `render.py`'s output, the control flow `orchestrate.py` inside it. Before anything
is created on Modal, the plan is validated (`render.validate`), credentials are checked (one line saying how to set
them up), the Volume's name must not belong to a v1 Volume, and the run must not be live: a second launch of a
running job is refused with one line naming its holder (the lease, read through the SDK) rather than attached to.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

from volembed_runner import store
from volembed_runner.backends.modal import render
from volembed_runner.errors import BackendError, BudgetExhausted, SourceError, StageError, unfixable
from volembed_runner.lease import check_free
from volembed_runner.plan import Plan, volembed_home

if TYPE_CHECKING:
    from volembed_runner.estimate.calibrate import ProbeLimits

CREDENTIALS_HINT = ("no Modal credentials: run `modal setup` (or `modal token new`), "
                    "or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET")
RUN_RECORD = "run.json"
POLL_SECONDS = 3.0  # how often an attached run on a terminal reads the progress record from the Volume


@dataclass(frozen=True)
class Launched:
    """A Modal run: followed to its end (`summary`), or submitted and left running (`detached`)."""

    name: str
    app_id: str | None
    call_id: str | None
    detached: bool
    summary: dict[str, Any] = field(default_factory=dict)


def has_credentials() -> bool:
    """True when the modal client has a token (environment or ~/.modal.toml) or OAuth credentials; no network."""
    from modal.config import config

    token = config.get("token_id") and config.get("token_secret")
    oauth = config.get("oauth_refresh_token") and config.get("oauth_client_id")
    return bool(token or oauth)


def require_credentials() -> None:
    """Raise BackendError (one line) when no Modal credentials are configured."""
    if not has_credentials():
        raise BackendError(CREDENTIALS_HINT)


@contextmanager
def _modal_errors(action: str) -> Iterator[None]:
    """Turn the SDK's authentication and connection failures into one-line BackendErrors."""
    from modal.exception import AuthError, Error
    from modal.exception import ConnectionError as ModalConnectionError

    from volembed_runner.errors import describe

    try:
        yield
    except AuthError as exc:
        raise BackendError(f"Modal rejected the credentials while trying to {action} ({describe(exc)}): "
                           "run `modal setup`, or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET") from exc
    except ModalConnectionError as exc:
        raise BackendError(f"could not reach Modal to {action}: {describe(exc)}") from exc
    except Error as exc:
        raise BackendError(f"Modal failed to {action}: {describe(exc)}") from exc


def build_dir(plan: Plan) -> Path:
    """Where `run` renders the app and records the run: $VOLEMBED_HOME/build/<name>/."""
    return volembed_home(plan.spec_path) / "build" / plan.name


def import_app(path: Path) -> ModuleType:
    """Import a rendered app from its file (registered in sys.modules, as Modal needs to find its functions)."""
    name = f"volembed_app_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BackendError(f"cannot import the rendered app {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _local_files(local: Path, remote: str) -> Iterator[tuple[Path, str]]:
    """(file, remote path) for a file, or for every file under a folder."""
    if local.is_dir():
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            yield path, f"{remote}/{path.relative_to(local).as_posix()}"
    else:
        yield local, remote


def upload_files(plan: Plan, on_upload: Callable[[int, str], None] | None = None) -> int:
    """Upload a `files` plan's dataset to `uploads/<data_fp>/` on its Volume, skipping files there with the same size.

    `on_upload(count, where)` hears of an upload before it starts. Returns the number of files uploaded.
    """
    import modal
    from modal.exception import NotFoundError

    layout = render.upload_layout(plan)
    if not layout:
        return 0
    vol = modal.Volume.from_name(plan.volume, create_if_missing=True, version=2)
    prefix = f"{render.UPLOADS_DIR}/{plan.data.fingerprint}"
    try:
        existing = {e.path.lstrip("/"): e.size for e in vol.listdir(prefix, recursive=True)}
    except NotFoundError:
        existing = {}
    todo = [(path, remote) for local, rel in layout for path, remote in _local_files(local, rel)
            if existing.get(remote) != path.stat().st_size]
    if todo:
        if on_upload is not None:
            on_upload(len(todo), f"{plan.volume}:/{prefix}")
        with vol.batch_upload(force=True) as batch:
            for path, remote in todo:
                batch.put_file(str(path), f"/{remote}")
    return len(todo)


def check_volume(plan: Plan) -> None:
    """Raise BackendError (one line) when the plan's Volume name belongs to a v1 Volume: the app mounts it as v2, and
    modal 1.6.4 raises InvalidError for that only while deploying, after the app was created (`volume.py`)."""
    import modal
    from modal.exception import InvalidError, NotFoundError

    with _modal_errors("look up the Volume"):
        try:
            modal.Volume.from_name(plan.volume, version=2).hydrate()
        except NotFoundError:
            return  # created (as v2) when the app starts
        except InvalidError:
            raise BackendError(f"Modal Volume {plan.volume!r} already exists as a v1 Volume (Modal's own tutorials "
                               "create v1 Volumes), and this app needs v2: set `volume:` in the spec to another "
                               "name") from None


def check_not_running(plan: Plan) -> None:
    """Raise RunHeld (one line, naming the holder) while another orchestrator of this run is alive on Modal, or left
    inputs running longer than a new one would wait for them (the lease in the workspace's Dict)."""
    import modal

    from volembed_runner.backends.modal.runtime import DictLeaseStore

    with _modal_errors("read the run's lease"):
        leases = modal.Dict.from_name(render.LEASE_DICT, create_if_missing=True)
        check_free(DictLeaseStore(leases, render.lease_run(plan)), wait=render.input_work_seconds(plan))


class ProgressPoller:
    """While an attached run goes, reads the manifest's `progress` record (`volembed_runner/progress.py`) every
    `every` seconds and hands each new one to `show`: the same record `status` prints, so the terminal's bars and
    `status` agree. The record found before the run starts (an earlier run's) is never shown; a failed read is
    skipped (the next one may succeed) and the last record is read once more at the end."""

    def __init__(self, read: Callable[[], dict[str, Any] | None], show: Callable[[dict[str, Any]], None],
                 every: float = POLL_SECONDS) -> None:
        self.read, self.show, self.every = read, show, every
        self.last_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_forever, daemon=True, name="progress-poller")

    def _current(self) -> dict[str, Any] | None:
        try:
            manifest = self.read()
        except (BackendError, OSError):
            return None
        record = (manifest or {}).get("progress")
        return record if isinstance(record, dict) else None

    def prime(self) -> None:
        """Remember the record already there, so that only the run's own records are shown."""
        record = self._current()
        self.last_at = None if record is None else record.get("at")

    def poll(self) -> None:
        """Read the record once; show it if it is new."""
        record = self._current()
        if record is not None and record.get("at") != self.last_at:
            self.last_at = record.get("at")
            self.show(record)

    def _poll_forever(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    def __enter__(self) -> ProgressPoller:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if exc_type is None:
            self.poll()


def run(plan: Plan, *, until: str | None, detach: bool,
        on_upload: Callable[[int, str], None] | None = None, prices: Path | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None) -> Launched:
    """Check, render `plan` into the build folder and run it on Modal.

    Attached, the app is ephemeral and this process follows the orchestrator (through its hand-overs) to the end:
    Modal's output (image builds, every container's log, the orchestrator's plain progress lines) streams here, or,
    with `on_progress`, none of it does and the progress record polled from the Volume goes to `on_progress`
    instead. modal 1.6.4 cannot stream one without the other: `enable_output()` turns on the status spinner, build
    logs and the app's log stream together, and the log stream ignores quiet mode (`_output/rich.py`,
    `put_streaming_log`), so two live displays would share the terminal.
    With `detach`, the app is deployed under the job's name and the orchestrator spawned on it, so the job, its
    hand-overs included, outlives this process; `status` reads its progress and `stop` ends it. Either way the
    orchestrator is spawned (Modal retries it server-side). Failed shards raise StageError (a rerun retries just
    them); a live run raises RunHeld.
    """
    render.validate(plan)
    require_credentials()
    import modal

    check_volume(plan)
    check_not_running(plan)
    folder = build_dir(plan)
    with _modal_errors("upload the dataset files"):
        upload_files(plan, on_upload)
    path = render.write_app(plan, folder / "app.py", prices)
    module = import_app(path)
    if detach:
        with _modal_errors("deploy the app"), modal.enable_output():
            module.app.deploy(name=plan.name)
            call = module.orchestrate.spawn(until or "")
        _record_run(folder, plan, app_id=module.app.app_id, deployed=True, call_id=call.object_id)
        return Launched(plan.name, module.app.app_id, call.object_id, detached=True)
    poller = None if on_progress is None else ProgressPoller(lambda: read_manifest(plan), on_progress)
    output = modal.enable_output() if poller is None else contextlib.nullcontext()
    with _modal_errors("run the app"), output, module.app.run():
        if poller is not None:
            poller.prime()
        call = module.orchestrate.spawn(until or "")
        _record_run(folder, plan, app_id=module.app.app_id, deployed=False, call_id=call.object_id)
        with poller or contextlib.nullcontext():
            summary = _follow(call.get())
    keep_measured_rate(plan)
    _check(plan, summary)
    return Launched(plan.name, module.app.app_id, call.object_id, detached=False, summary=summary)


def probe(plan: Plan, texts: list[str], n_tokens: list[int], keep: int, limits: ProbeLimits) -> dict[str, Any]:
    """The GPU probe: the job's own app, run ephemerally, calls its Embedder once on the plan's GPU with a sample of
    the job's chunks (`Embedder.probe`), so the image, router flags and client are the run's. The call runs under
    the probe's own `limits` (`Cls.with_options(timeout=, retries=)`, modal 1.6.4 `cls.py`: a variant of the class
    with those options), not the job's, so its worst case is the one priced. The app stops as soon as the call
    returns, which ends the container (no scale-down idle). Returns the container's timings, a few vectors, the
    call's wall time seen from here and the TEI image."""
    render.validate(plan)
    require_credentials()
    import modal

    check_volume(plan)
    path = render.write_app(plan, build_dir(plan) / f"probe-{plan.compute.gpu}.py")
    module = import_app(path)
    with _modal_errors(f"run the GPU probe on {plan.compute.gpu}"), modal.enable_output(), module.app.run():
        started = time.monotonic()
        embedder = module.Embedder.with_options(timeout=limits.timeout_s, retries=limits.retries)
        result = embedder().probe.remote(texts, n_tokens, keep)
        wall = time.monotonic() - started
    registry, tag = render.tei_image(plan)
    return {**result, "call_seconds": wall, "image": f"{registry}:{tag}"}


def _follow(summary: dict[str, Any]) -> dict[str, Any]:
    import modal

    from volembed_runner.backends.modal.runtime import follow_handovers

    return follow_handovers(summary, lambda call_id: modal.FunctionCall.from_id(call_id).get())


def _check(plan: Plan, summary: dict[str, Any]) -> None:
    """Raise StageError when the run left failed shards or stopped without finishing."""
    failed = {stage: shards for stage, shards in (summary.get("failed") or {}).items() if shards}
    if failed:
        listed = "; ".join(f"{stage}: {len(shards)} shard(s) ({', '.join(shards[:5])}"
                           f"{', …' if len(shards) > 5 else ''})" for stage, shards in failed.items())
        if unfixable(sum(len(shards) for shards in failed.values()), summary.get("unretryable")):
            raise SourceError(f"{plan.name}: failed shards — {listed}, on input a rerun cannot fix; causes in "
                              "`volembed-run status`: fix the input, then rerun")
        raise StageError(f"{plan.name}: failed shards — {listed}; causes in `volembed-run status`, "
                         "a rerun retries only them")
    cost = summary.get("budget") or {}
    if cost.get("stopped_at_budget"):
        measured = cost.get("measured_tokens_per_second")
        rate = f" at the measured {measured:,.0f} tokens/s per GPU" if measured else ""
        raise BudgetExhausted(f"{plan.name}: stopped feeding at ${cost['spent_usd']:,.2f} spent: the next unit, with "
                              f"those in flight, would have brought it to ${cost['would_reach_usd']:,.2f}{rate}, over "
                              f"compute.max_cost ${cost['max_cost_usd']:,.2f}; {cost['remaining_embed_units']} embed "
                              f"unit(s) left (projected total ${cost['projected_total_usd']:,.2f}); finished units are "
                              "kept: raise compute.max_cost and rerun to continue")
    if summary.get("handover"):
        raise StageError(f"{plan.name}: stopped after {summary.get('passes')} orchestrator passes without finishing; "
                         "rerun the spec to continue")


def _record_run(folder: Path, plan: Plan, *, app_id: str | None, deployed: bool, call_id: str | None) -> None:
    """Remember the app of the run, so `stop` finds it (an ephemeral app cannot be looked up by name)."""
    record = {"app_id": app_id, "app_name": plan.name, "deployed": deployed, "call_id": call_id,
              "volume": plan.volume, "started_at": store.utc_stamp()}
    store.write_json_atomic(folder / RUN_RECORD, record)


def _read_run(plan: Plan) -> dict[str, Any] | None:
    try:
        return store.read_json(build_dir(plan) / RUN_RECORD)
    except (OSError, ValueError):  # unreadable: `stop` falls back to the app's name
        return None


def keep_measured_rate(plan: Plan, manifest: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Store the embed rate a finished run measured (its manifest on the Volume, or `manifest` as read) where later
    dry runs read rates (`rates.store_run_rate`); returns the entry stored. An unreadable manifest stores nothing:
    the run's own outcome is what its caller reports."""
    from volembed_runner.estimate.rates import store_run_rate

    if manifest is None:
        try:
            manifest = status(plan)
        except BackendError:
            return None
    return store_run_rate(manifest)


def read_manifest(plan: Plan) -> dict[str, Any] | None:
    """The run's manifest.json as on its Volume now, or None when there is none yet."""
    import modal
    from modal.exception import NotFoundError

    remote = store.manifest_path(Path("/"), plan.name).as_posix()
    with _modal_errors("read the manifest"):
        try:
            data = b"".join(modal.Volume.from_name(plan.volume).read_file(remote))
        except (NotFoundError, FileNotFoundError):
            return None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise BackendError(f"{plan.volume}:{remote} is not valid JSON ({exc})") from None


def status(plan: Plan) -> dict[str, Any]:
    """The run's manifest.json, read from its Volume (live progress while the job runs: its `progress` record)."""
    require_credentials()
    manifest = read_manifest(plan)
    if manifest is None:
        remote = store.manifest_path(Path("/"), plan.name).as_posix()
        raise BackendError(f"no manifest at {plan.volume}:{remote} yet: {plan.name} has not started on Modal "
                           "(or the volume name changed)")
    return manifest


def stop(plan: Plan) -> str:
    """Stop the job's running app (the one `run` started here, else a deployed app of that name); returns its id."""
    require_credentials()
    import modal
    from modal.exception import NotFoundError

    record = _read_run(plan) or {}
    ident = record.get("app_id") or plan.name
    with _modal_errors("stop the app"):
        try:
            handle = modal.App.lookup(ident)
            handle.stop()
        except NotFoundError:
            raise BackendError(f"no Modal app {ident} to stop; `modal app list` shows running apps, "
                               "`modal app stop <id>` stops one") from None
    return str(getattr(handle, "app_id", None) or ident)
