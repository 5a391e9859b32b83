"""Offline fake of the Modal control plane (modal 1.6.x) for testing generated apps.

A grpclib server on a unix socket answers every RPC of `ModalClientBase` (reference/modal-sdk.md §2.4), records the
requests, and keeps the state the runner relies on, modelled on Modal's own mock servicer (`MockClientServicer`,
modal-labs/modal-client `py/test/conftest.py`) and held to what the real service enforces:

* Volumes are named objects with a version. `VolumeGetOrCreate` answers an existing Volume with *its* version,
  whatever was requested (as the mock does; the modal 1.6.4 client then raises InvalidError for a v2 request on a v1
  Volume, `volume.py` `_validate_version`); a missing one is NOT_FOUND unless `create_if_missing`. `VolumeCommit`
  answers `skip_reload=True`, as for a function's mount with background commits (`volume.py` mounts with
  `allow_background_commits=True`; modal-client commit efba91cd3 added `skip_reload` for them), so a caller that
  wants other containers' files must reload.
* Dicts (`DictGetOrCreate`, `DictUpdate` with `if_not_exists`, `DictGet`, `DictContains`, `DictPop`, `DictLen`) keyed
  by the pickled bytes the client sends (modal 1.6.4 `dict.py`); `if_not_exists` with more than one update is
  INVALID_ARGUMENT, as in the mock.
* `FunctionCreate` refuses a timeout outside 1..86400 s (INVALID_ARGUMENT; Modal's documented range,
  https://modal.com/docs/guide/timeouts, which the 1.6.4 client does not check itself) and remembers each
  function's retry policy. `FunctionMap` hands that policy back with `sync_client_retries_enabled`, so the client
  retries each failed input of a `.map` on its own (`parallel_map.py`), and ASYNC calls (`.spawn()`) are retried
  here, server-side, by the same policy.
* `FunctionBindParams` (what `Cls.with_options(...)` sends before its first call: modal 1.6.4
  `_function_variants.py` `_make_function_variant`) answers a variant of the function: an id of its own, the base's
  name and methods, the options' retry policy in place of the base's, and their timeout held to the same range.
* An app's log stream stays open until its client disconnects or it is stopped, then ends with `app_done` (as the
  mock's `AppGetLogs`), so the client does not poll for logs.
* Inputs run on the server's side: a worker registered for the function (`Recorder.workers`, e.g. the rendered
  module's `.local()` bodies) runs each attempt in a thread, its return value or raised exception becoming the
  input's result as a container's would (`_runtime/container_io_manager.py`: an exception is pickled with status
  FAILURE). An input keeps running to its end when the client that submitted it closes its map or goes away, as on
  Modal: closing a map sends no cancellation (`parallel_map.py`; `FunctionCallCancel` is sent only by
  `FunctionCall.cancel`). Every attempt is recorded with its start and end (`Recorder.attempts`).

Tests assert on the recorded protos (`FunctionCreate`, `ImageGetOrCreate`, `VolumeGetOrCreate`, ...) and attempts.
No credentials, no network.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpclib.const
import grpclib.server
import modal
from grpclib import GRPCError, Status
from modal._serialization import deserialize_data_format, serialize, serialize_data_format
from modal_proto import api_grpc
from modal_proto import api_pb2 as A

MAX_TIMEOUT_S = 86_400
SUCCESS, FAILURE = A.GenericResult.GENERIC_STATUS_SUCCESS, A.GenericResult.GENERIC_STATUS_FAILURE


def _jwt(fields: dict[str, Any]) -> str:
    """An unsigned JWT (the client decodes `input_jwt` without verifying it: `_utils/jwt_utils.py`)."""
    def enc(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()

    return f"{enc(json.dumps({'alg': 'none'}))}.{enc(json.dumps(fields))}."


def _unjwt(token: str) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    return payload


@dataclass
class Attempt:
    """One attempt at one input, as a container ran it."""

    call_id: str
    function: str  # "download", "Embedder.embed", ...
    idx: int
    retry: int
    args: tuple[Any, ...]
    started: float
    finished: float | None = None
    status: int | None = None


@dataclass
class _Call:
    function_id: str
    invocation: int
    outputs: list[Any] = field(default_factory=list)


class Recorder:
    """Every request the client sent, what it created, and the state of Volumes, Dicts and function calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.stamps: list[float] = []  # when each of `calls` arrived
        self._ids = itertools.count(1)
        self.builder_version = "2025.06"
        self._vol_ids: list[tuple[str, str]] = []
        self._images: dict[str, Any] = {}
        self.volumes: dict[str, tuple[str, int]] = {}  # name → (volume id, version)
        self.dicts: dict[str, dict[bytes, bytes]] = {}  # dict id → entries
        self.dict_names: dict[str, str] = {}  # name → dict id
        self.function_names: dict[str, str] = {}  # function id → name
        self.retry_policies: dict[str, A.FunctionRetryPolicy] = {}  # function id → policy (when it has one)
        self.handles: dict[str, A.FunctionHandleMetadata] = {}  # function id → its handle metadata, as answered
        self.workers: dict[str, Callable[..., Any]] = {}  # "chunk", "Embedder.embed", ... → what runs an input
        self.attempts: list[Attempt] = []
        self.max_inputs_outstanding = 1000
        self._calls_by_id: dict[str, _Call] = {}
        self._pool = ThreadPoolExecutor(32, thread_name_prefix="fake-container")
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs_ready: asyncio.Event | None = None
        self._apps_done: dict[str, asyncio.Event] = {}

    def app_done(self, app_id: str) -> asyncio.Event:
        """Set once the app's client disconnected or the app was stopped (what ends its log stream)."""
        return self._apps_done.setdefault(app_id, asyncio.Event())

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):06d}"

    def requests(self, method: str) -> list[Any]:
        return [r for m, r in self.calls if m == method]

    def volume_names(self) -> dict[str, str]:
        """volume_id → name."""
        return dict(self._vol_ids)

    def functions(self) -> dict[str, Any]:
        """function_name → api_pb2.Function as sent."""
        out = {}
        for req in self.requests("FunctionCreate"):
            fn = _function_of(req)
            out[fn.function_name] = fn
        return out

    def dockerfile(self, image_id: str) -> list[str]:
        """All Dockerfile lines of an image, base layers first."""
        img = self._images[image_id]
        lines: list[str] = []
        for base in img.base_images:
            lines += self.dockerfile(base.image_id)
        return lines + list(img.dockerfile_commands)

    def image_chain(self, image_id: str) -> list[Any]:
        """An image and its bases, as sent (api_pb2.Image), base first."""
        img = self._images[image_id]
        chain: list[Any] = []
        for base in img.base_images:
            chain += self.image_chain(base.image_id)
        return [*chain, img]

    def add_volume(self, name: str, version: int) -> None:
        """A Volume that exists before the test (e.g. a v1 Volume a tutorial created)."""
        vid = self.new_id("vo")
        self.volumes[name] = (vid, version)
        self._vol_ids.append((vid, name))

    def dict_entries(self, name: str) -> dict[Any, Any]:
        """A named Dict's entries, unpickled."""
        from modal._serialization import deserialize

        entries = self.dicts.get(self.dict_names.get(name, ""), {})
        return {deserialize(k, None): deserialize(v, None) for k, v in entries.items()}

    def put_dict(self, name: str, key: Any, value: Any) -> None:
        """Write a Dict entry as a client would (the Dict is created if missing)."""
        if name not in self.dict_names:
            self.dict_names[name] = self.new_id("di")
            self.dicts[self.dict_names[name]] = {}
        self.dicts[self.dict_names[name]][serialize(key)] = serialize(value)

    def attempts_of(self, function: str) -> list[Attempt]:
        with self._lock:
            return [a for a in self.attempts if a.function == function]

    # ── volumes ──────────────────────────────────────────────────────────────────────────────────────────────────
    def VolumeGetOrCreate(self, req: Any) -> Any:
        name = req.deployment_name
        if name not in self.volumes:
            if req.object_creation_type != A.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
                raise GRPCError(Status.NOT_FOUND, f"Volume '{name}' not found")
            self.add_volume(name, req.version or A.VOLUME_FS_VERSION_V1)
        vid, version = self.volumes[name]
        return A.VolumeGetOrCreateResponse(volume_id=vid, version=version,
                                           metadata=A.VolumeMetadata(name=name, version=version))

    def VolumeCommit(self, req: Any) -> Any:
        return A.VolumeCommitResponse(skip_reload=True)

    # ── dicts ────────────────────────────────────────────────────────────────────────────────────────────────────
    def DictGetOrCreate(self, req: Any) -> Any:
        name = req.deployment_name
        if name not in self.dict_names:
            if req.object_creation_type != A.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
                raise GRPCError(Status.NOT_FOUND, f"Dict '{name}' not found")
            self.dict_names[name] = self.new_id("di")
            self.dicts[self.dict_names[name]] = {}
        return A.DictGetOrCreateResponse(dict_id=self.dict_names[name], metadata=A.DictMetadata(name=name))

    def DictUpdate(self, req: Any) -> Any:
        entries = self.dicts[req.dict_id]
        if req.if_not_exists:
            if len(req.updates) != 1:
                raise GRPCError(Status.INVALID_ARGUMENT, "if_not_exists needs exactly one update")
            if req.updates[0].key in entries:
                return A.DictUpdateResponse(created=False)
        for update in req.updates:
            entries[update.key] = update.value
        return A.DictUpdateResponse(created=True)

    def DictGet(self, req: Any) -> Any:
        entries = self.dicts[req.dict_id]
        return A.DictGetResponse(found=req.key in entries, value=entries.get(req.key, b""))

    def DictContains(self, req: Any) -> Any:
        return A.DictContainsResponse(found=req.key in self.dicts[req.dict_id])

    def DictPop(self, req: Any) -> Any:
        entries = self.dicts[req.dict_id]
        if req.key in entries:
            return A.DictPopResponse(found=True, value=entries.pop(req.key))
        return A.DictPopResponse(found=False)

    def DictLen(self, req: Any) -> Any:
        return A.DictLenResponse(len=len(self.dicts[req.dict_id]))

    # ── functions ────────────────────────────────────────────────────────────────────────────────────────────────
    def FunctionPrecreate(self, req: Any) -> Any:
        fid = req.existing_function_id or self.new_id("fu")
        self.function_names[fid] = req.function_name
        self.handles[fid] = _handle_metadata(req.function_name, req.method_definitions)
        return A.FunctionPrecreateResponse(function_id=fid, handle_metadata=self.handles[fid])

    def FunctionCreate(self, req: Any) -> Any:
        fn = _function_of(req)
        if not 1 <= fn.timeout_secs <= MAX_TIMEOUT_S:
            raise GRPCError(Status.INVALID_ARGUMENT,
                            f"timeout must be between 1 and {MAX_TIMEOUT_S} seconds, got {fn.timeout_secs}")
        fid = req.existing_function_id or self.new_id("fu")
        self.function_names[fid] = fn.function_name
        if fn.HasField("retry_policy"):
            self.retry_policies[fid] = fn.retry_policy
        data = req.function_data if not req.HasField("function") else A.FunctionData(
            ranked_functions=[A.FunctionData.RankedFunction(function=fn)])
        self.handles[fid] = _handle_metadata(fn.function_name, fn.method_definitions)
        return A.FunctionCreateResponse(function_id=fid, handle_metadata=self.handles[fid], function_data=data)

    def FunctionBindParams(self, req: Any) -> Any:
        options = req.function_options
        if options.HasField("timeout_secs") and not 1 <= options.timeout_secs <= MAX_TIMEOUT_S:
            raise GRPCError(Status.INVALID_ARGUMENT,
                            f"timeout must be between 1 and {MAX_TIMEOUT_S} seconds, got {options.timeout_secs}")
        base = req.function_id
        fid = self.new_id("fu")
        self.function_names[fid] = self.function_names[base]
        policy = options.retry_policy if options.HasField("retry_policy") else self.retry_policies.get(base)
        if policy is not None:
            self.retry_policies[fid] = policy
        self.handles[fid] = self.handles[base]
        return A.FunctionBindParamsResponse(bound_function_id=fid, handle_metadata=self.handles[fid])

    def FunctionMap(self, req: Any) -> Any:
        fc = self.new_id("fc")
        call = _Call(req.function_id, req.function_call_invocation_type)
        self._calls_by_id[fc] = call
        pipelined = []
        for item in req.pipelined_inputs:  # `.spawn()` / `.remote()` send their one input with the map
            input_id = self.new_id("in")
            pipelined.append(A.FunctionPutInputsResponseItem(
                idx=item.idx, input_id=input_id, input_jwt=_jwt({"idx": item.idx, "input_id": input_id, "fc": fc})))
            self._start(fc, item.idx, input_id, 0, item.input)
        return A.FunctionMapResponse(
            function_call_id=fc, pipelined_inputs=pipelined, function_call_jwt=_jwt({"fc": fc}),
            retry_policy=self.retry_policies.get(req.function_id), sync_client_retries_enabled=True,
            max_inputs_outstanding=self.max_inputs_outstanding)

    def FunctionPutInputs(self, req: Any) -> Any:
        out = []
        for item in req.inputs:
            input_id = self.new_id("in")
            out.append(A.FunctionPutInputsResponseItem(
                idx=item.idx, input_id=input_id,
                input_jwt=_jwt({"idx": item.idx, "input_id": input_id, "fc": req.function_call_id})))
            self._start(req.function_call_id, item.idx, input_id, 0, item.input)
        return A.FunctionPutInputsResponse(inputs=out)

    def FunctionRetryInputs(self, req: Any) -> Any:
        fc = _unjwt(req.function_call_jwt)["fc"]
        tokens = []
        for item in req.inputs:
            info = _unjwt(item.input_jwt)
            tokens.append(_jwt({**info, "retry": item.retry_count}))
            self._start(fc, info["idx"], info["input_id"], item.retry_count, item.input)
        return A.FunctionRetryInputsResponse(input_jwts=tokens)

    async def FunctionGetOutputs(self, req: Any) -> Any:
        call = self._calls_by_id.get(req.function_call_id)
        if call is None or (req.clear_on_success and req.timeout == 0):  # the map's closing acknowledgement
            return A.FunctionGetOutputsResponse()
        deadline = time.monotonic() + min(req.timeout or 1.0, 1.0)
        while not call.outputs and time.monotonic() < deadline:
            assert self._outputs_ready is not None
            self._outputs_ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outputs_ready.wait(), timeout=max(0.0, deadline - time.monotonic()))
        outputs, call.outputs = call.outputs, []
        return A.FunctionGetOutputsResponse(outputs=outputs, last_entry_id=str(len(self.calls)))

    def _start(self, fc: str, idx: int, input_id: str, retry: int, payload: Any) -> None:
        """Run one attempt of one input in a worker thread (a container), its result queued for the caller."""
        call = self._calls_by_id[fc]
        name = self.function_names.get(call.function_id, "?").removesuffix(".*")
        if payload.method_name:
            name = f"{name}.{payload.method_name}"
        args, kwargs = deserialize_data_format(payload.args, payload.data_format, None)
        attempt = Attempt(fc, name, idx, retry, tuple(args), time.time())
        with self._lock:
            self.attempts.append(attempt)
        assert self._loop is not None
        asyncio.ensure_future(self._run(call, attempt, input_id, payload, kwargs), loop=self._loop)

    async def _run(self, call: _Call, attempt: Attempt, input_id: str, payload: Any, kwargs: dict[str, Any]) -> None:
        worker = self.workers.get(attempt.function)
        loop = asyncio.get_running_loop()
        if worker is None:
            result = A.GenericResult(status=FAILURE, exception=f"no worker for {attempt.function} in the fake",
                                     data=serialize(RuntimeError(f"no worker for {attempt.function}")))
        else:
            try:
                value = await loop.run_in_executor(self._pool, lambda: worker(*attempt.args, **kwargs))
                result = A.GenericResult(status=SUCCESS, data=serialize_data_format(value, A.DATA_FORMAT_PICKLE))
            except Exception as exc:  # what a container does with an exception: pickle it, status FAILURE
                result = A.GenericResult(status=FAILURE, data=serialize(exc), exception=repr(exc))
        attempt.finished, attempt.status = time.time(), result.status
        policy = self.retry_policies.get(call.function_id)
        if (call.invocation == A.FUNCTION_CALL_INVOCATION_TYPE_ASYNC and result.status != SUCCESS
                and policy is not None and attempt.retry < policy.retries):  # server-side retries for `.spawn()`
            await asyncio.sleep(0)
            self._start_retry(call, attempt, input_id, payload)
            return
        call.outputs.append(A.FunctionGetOutputsItem(idx=attempt.idx, input_id=input_id, result=result,
                                                     data_format=A.DATA_FORMAT_PICKLE, retry_count=attempt.retry))
        assert self._outputs_ready is not None
        self._outputs_ready.set()

    def _start_retry(self, call: _Call, attempt: Attempt, input_id: str, payload: Any) -> None:
        fc = next(k for k, v in self._calls_by_id.items() if v is call)
        self._start(fc, attempt.idx, input_id, attempt.retry + 1, payload)


def _handle_metadata(name: str, methods: Any) -> Any:
    """A function's handle metadata, with one entry per method of a class service function (as the mock's
    `FunctionPrecreate` builds it; the client needs them to call `Cls().method`)."""
    return A.FunctionHandleMetadata(function_name=name, method_handle_metadata={
        method: A.FunctionHandleMetadata(function_name=definition.function_name, function_type=definition.function_type,
                                         is_method=True, use_method_name=method)
        for method, definition in methods.items()})


def _function_of(req: Any) -> Any:
    return req.function if req.HasField("function") else req.function_data.ranked_functions[0].function


def _respond(rec: Recorder, method: str, req: Any) -> Any:
    """Answers for the RPCs deploy needs that keep no state here."""
    if method == "AppCreate":
        return A.AppCreateResponse(app_id=rec.new_id("ap"))
    if method == "AppPublish":
        return A.AppPublishResponse(url="https://fake.invalid")
    if method == "EnvironmentGetOrCreate":
        return A.EnvironmentGetOrCreateResponse(
            environment_id="en-1",
            metadata=A.EnvironmentMetadata(
                name="main", settings=A.EnvironmentSettings(image_builder_version=rec.builder_version)))
    if method == "SecretGetOrCreate":
        return A.SecretGetOrCreateResponse(secret_id=rec.new_id("st"))
    if method == "MountGetOrCreate":
        return A.MountGetOrCreateResponse(
            mount_id=rec.new_id("mo"), handle_metadata=A.MountHandleMetadata(content_checksum_sha256_hex="0" * 64))
    if method == "ImageGetOrCreate":
        iid = rec.new_id("im")
        rec._images[iid] = req.image
        return A.ImageGetOrCreateResponse(
            image_id=iid, result=A.GenericResult(status=SUCCESS),
            metadata=A.ImageMetadata(image_builder_version=rec.builder_version))
    if method == "ClassCreate":
        return A.ClassCreateResponse(class_id=rec.new_id("cs"))
    return None  # → the empty default response of the right type


class _Servicer:
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def __getattr__(self, name: str) -> Any:  # lets ModalClientBase.__mapping__ enumerate the RPCs
        if name[:1].isupper():
            return None
        raise AttributeError(name)

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        out = {}
        for path, h in api_grpc.ModalClientBase.__mapping__(self).items():
            out[path] = grpclib.const.Handler(
                self._handler(path.rsplit("/", 1)[1], h), h.cardinality, h.request_type, h.reply_type)
        return out

    def _handler(self, method: str, h: grpclib.const.Handler) -> Any:
        unary_req = h.cardinality in (grpclib.const.Cardinality.UNARY_UNARY, grpclib.const.Cardinality.UNARY_STREAM)
        rec = self.rec

        async def handler(stream: Any) -> None:
            req = await stream.recv_message() if unary_req else None
            rec.calls.append((method, req))
            rec.stamps.append(time.time())
            if method == "AppGetLogs":  # as the mock: hold the stream until the app is done, then say so
                await rec.app_done(req.app_id).wait()
                await stream.send_message(A.TaskLogsBatch(app_done=True))
                return
            if method in ("AppClientDisconnect", "AppStop"):
                rec.app_done(req.app_id).set()
            stateful = getattr(Recorder, method, None) if method[:1].isupper() else None
            if stateful is not None:
                resp = stateful(rec, req)
                if asyncio.iscoroutine(resp):
                    resp = await resp
            else:
                resp = _respond(rec, method, req)
            await stream.send_message(resp or h.reply_type())
        return handler


@contextlib.contextmanager
def fake_modal_server(builder_version: str = "2025.06") -> Iterator[Recorder]:
    """Serve the fake on a unix socket and point the modal client at it (with dummy tokens) while inside."""
    from modal.client import _Client

    rec = Recorder()
    rec.builder_version = builder_version
    sock = os.path.join(tempfile.mkdtemp(), "modal.sock")
    loop, started, box = asyncio.new_event_loop(), threading.Event(), {}

    async def start() -> None:  # the grpclib Server (and the fake's event) must be created inside its own loop
        rec._loop, rec._outputs_ready = loop, asyncio.Event()
        box["server"] = grpclib.server.Server([_Servicer(rec)])
        await box["server"].start(path=sock)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    async def stop() -> None:
        box["server"].close()
        await box["server"].wait_closed()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait()
    keys = ("MODAL_SERVER_URL", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(MODAL_SERVER_URL=f"unix://{sock}", MODAL_TOKEN_ID="ak-test", MODAL_TOKEN_SECRET="as-test")
    _Client._set_env_client(None)  # forget a client cached against an earlier fake
    try:
        yield rec
    finally:
        modal.Client.from_env().close()  # close the cached client (and un-cache it)
        _Client._set_env_client(None)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        rec._pool.shutdown(wait=True, cancel_futures=True)
        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
