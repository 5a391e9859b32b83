"""Offline fake of the Modal control plane (modal 1.6.x) for testing generated apps.

From reference/modal-sdk.md §2.4: a grpclib server on a unix socket answers every RPC of `ModalClientBase`, records
the requests, and gives real answers to the ~10 that `app.deploy()` needs (plus `FunctionMap`, so `.spawn()` returns
a call). Tests assert on the recorded protos
(`FunctionCreate`, `ImageGetOrCreate`, `VolumeGetOrCreate`, ...). No credentials, no network.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import grpclib.const
import grpclib.server
import modal
from modal_proto import api_grpc
from modal_proto import api_pb2 as A


class Recorder:
    """Every request the client sent, plus what deploy created (volumes, images)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self._ids = itertools.count(1)
        self.builder_version = "2025.06"
        self._vol_ids: list[tuple[str, str]] = []
        self._images: dict[str, Any] = {}

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
            fn = req.function if req.HasField("function") else req.function_data.ranked_functions[0].function
            out[fn.function_name] = fn
        return out

    def dockerfile(self, image_id: str) -> list[str]:
        """All Dockerfile lines of an image, base layers first."""
        img = self._images[image_id]
        lines: list[str] = []
        for base in img.base_images:
            lines += self.dockerfile(base.image_id)
        return lines + list(img.dockerfile_commands)


def _respond(rec: Recorder, method: str, req: Any) -> Any:
    if method == "AppCreate":
        return A.AppCreateResponse(app_id=rec.new_id("ap"))
    if method == "AppPublish":
        return A.AppPublishResponse(url="https://fake.invalid")
    if method == "EnvironmentGetOrCreate":
        return A.EnvironmentGetOrCreateResponse(
            environment_id="en-1",
            metadata=A.EnvironmentMetadata(
                name="main", settings=A.EnvironmentSettings(image_builder_version=rec.builder_version)))
    if method == "VolumeGetOrCreate":
        vid = rec.new_id("vo")
        rec._vol_ids.append((vid, req.deployment_name))
        return A.VolumeGetOrCreateResponse(
            volume_id=vid, metadata=A.VolumeMetadata(name=req.deployment_name, version=req.version or 1))
    if method == "SecretGetOrCreate":
        return A.SecretGetOrCreateResponse(secret_id=rec.new_id("st"))
    if method == "MountGetOrCreate":
        return A.MountGetOrCreateResponse(
            mount_id=rec.new_id("mo"), handle_metadata=A.MountHandleMetadata(content_checksum_sha256_hex="0" * 64))
    if method == "ImageGetOrCreate":
        iid = rec.new_id("im")
        rec._images[iid] = req.image
        return A.ImageGetOrCreateResponse(
            image_id=iid, result=A.GenericResult(status=A.GenericResult.GENERIC_STATUS_SUCCESS),
            metadata=A.ImageMetadata(image_builder_version=rec.builder_version))
    if method == "FunctionPrecreate":
        return A.FunctionPrecreateResponse(
            function_id=rec.new_id("fu"), handle_metadata=A.FunctionHandleMetadata(function_name=req.function_name))
    if method == "FunctionCreate":
        fn = req.function if req.HasField("function") else req.function_data.ranked_functions[0].function
        data = req.function_data if not req.HasField("function") else A.FunctionData(
            ranked_functions=[A.FunctionData.RankedFunction(function=fn)])
        return A.FunctionCreateResponse(
            function_id=req.existing_function_id or rec.new_id("fu"),
            handle_metadata=A.FunctionHandleMetadata(function_name=fn.function_name), function_data=data)
    if method == "ClassCreate":
        return A.ClassCreateResponse(class_id=rec.new_id("cs"))
    if method == "FunctionMap":  # beyond the reference: lets `.spawn()` create a call (its input is never run)
        return A.FunctionMapResponse(
            function_call_id=rec.new_id("fc"),
            pipelined_inputs=[A.FunctionPutInputsResponseItem(idx=0, input_id=rec.new_id("in"))])
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

        async def handler(stream: Any) -> None:
            req = await stream.recv_message() if unary_req else None
            self.rec.calls.append((method, req))
            if method == "AppGetLogs":
                return  # close the log stream immediately
            await stream.send_message(_respond(self.rec, method, req) or h.reply_type())
        return handler


@contextlib.contextmanager
def fake_modal_server(builder_version: str = "2025.06") -> Iterator[Recorder]:
    """Serve the fake on a unix socket and point the modal client at it (with dummy tokens) while inside."""
    from modal.client import _Client

    rec = Recorder()
    rec.builder_version = builder_version
    sock = os.path.join(tempfile.mkdtemp(), "modal.sock")
    loop, started, box = asyncio.new_event_loop(), threading.Event(), {}

    async def start() -> None:  # the grpclib Server must be created inside its own loop
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
        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
