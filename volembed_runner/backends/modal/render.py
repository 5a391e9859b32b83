"""Plan → the source of one self-contained Modal app, from the template `app.py.tmpl` beside this module.

The template is a real Python module whose only placeholders sit in its configuration block. Each is filled with a
Python literal of plain data (`repr()` of JSON-normalized values), so no spec value can become code, and the same
Plan always renders the same bytes. Sizing that depends on the GPU (TEI image tag, router flags, CPU cores) is
derived here, from the catalog and TEI's queueing and batching (router/src/main.rs, core/src/queue.rs of
https://github.com/huggingface/text-embeddings-inference/tree/v1.9.3).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from volembed_runner import catalog
from volembed_runner.errors import BackendError, SpecError, SpecIssue
from volembed_runner.estimate.cost import budget_of
from volembed_runner.estimate.prices import load_prices
from volembed_runner.estimate.rates import Rate, tei_rate
from volembed_runner.models import MODEL_FILE_PATTERNS
from volembed_runner.plan import MODAL_ROOT, Plan
from volembed_runner.redact import public_record
from volembed_runner.units import check_fleet, fleet_of

TEMPLATE = "app.py.tmpl"
PYTHON_VERSION = "3.12"

CONSTRAINTS = "constraints.txt"  # shipped in the package: the versions CI installs, and the images pin


def read_pins() -> dict[str, str]:
    """Package name (normalized: lowercase, `-`) → exact version, from the package's constraints file: the one list
    of versions, which CI and the README's test command install with, so the images run tested libraries."""
    pins: dict[str, str] = {}
    text = resources.files("volembed_runner").joinpath(CONSTRAINTS).read_text(encoding="utf-8")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise BackendError(f"{CONSTRAINTS}: {line!r} is not an exact pin NAME==VERSION")
            pins[_normalized(name)] = version.strip()
    return pins


def _normalized(name: str) -> str:
    """A distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _pinned(names: tuple[str, ...]) -> tuple[str, ...]:
    pins = read_pins()
    return tuple(f"{name}=={pins[_normalized(name)]}" for name in names)


# CPU stages (download, chunk, orchestrate): readers, the tokenizer, the Hub client; never torch.
CPU_PACKAGES = _pinned(("httpx", "huggingface_hub", "numpy", "orjson", "pyarrow", "pydantic", "pypdf", "pyyaml",
                        "rich", "tokenizers"))
# The index stage's library (output.index: lancedb): in the CPU image only when the spec has an index stage.
INDEX_PACKAGES = _pinned(("lancedb",))
# GPU stage: the TEI client and the parquet writer next to the router (huggingface_hub for the weights build step).
TEI_PACKAGES = _pinned(("httpx", "huggingface_hub", "numpy", "orjson", "pyarrow", "pydantic", "pyyaml"))

# Late interaction: the GPU image is PyTorch for the GPU's CUDA (PyPI's Linux torch wheel) with PyLate, as tested
# here; PyLate itself goes in with --no-deps (its own pins cannot resolve beside torch 2.13: pyproject `[late]`).
LATE_PACKAGES = _pinned(("torch", "sentence-transformers", "transformers", "datasets", "voyager", "huggingface_hub",
                         "numpy", "orjson", "pyarrow", "pydantic", "pyyaml", "tokenizers"))
PYLATE_PACKAGE, = _pinned(("pylate",))
# A ColBERT checkpoint's files: a PyLate folder (modules.json, 1_Dense/) or a Stanford one (artifact.metadata and
# the projection inside the weights, which may be only pytorch_model.bin).
LATE_MODEL_FILES = [*MODEL_FILE_PATTERNS, "1_Dense/*", "artifact.metadata", "pytorch_model.bin"]

UPLOADS_DIR = "uploads"
TEI_HOST = "127.0.0.1"
TEI_PORT = 8000
TEI_PROMETHEUS_PORT = 9000
# The chunk stage reads only the tokenizer: the CPU image gets this file, the GPU image the whole model.
TOKENIZER_FILES = ["tokenizer.json"]

ROUTER_READY_MARGIN_S = 120  # the router's own deadline, shorter than Modal's startup timeout, so it says why
ORCHESTRATE_TIMEOUT_S = 24 * 3600  # Modal's maximum per attempt
# An orchestrator stops feeding inputs this long before its timeout, plus the longest one input can run: what it
# fed drains before it hands over, and the margin records the manifest and spawns the next orchestrator.
HANDOVER_MARGIN_S = 1800
MIN_FEEDING_S = 3600  # the least time an orchestrator must have to feed inputs, or the spec is refused
MAX_PASSES = 60  # hand-overs before giving up
LEASE_DICT = "volembed-runner-leases"  # the workspace's modal.Dict of run leases
RETRY_INITIAL_DELAY_S, RETRY_BACKOFF = 5.0, 2.0  # the stages' modal.Retries
RETRY_MAX_DELAY_S = 60.0  # Modal clamps a retry's delay to at most this (modal 1.6.4 retries.py)

# TEI router sizing: one permit per input text (--max-concurrent-requests), batches filled up to --max-batch-tokens
# from its queue (router/src/http/server.rs, core/src/queue.rs of TEI v1.9.3).
MIN_CLIENT_BATCH, MAX_CLIENT_BATCH = 32, 512
QUEUE_BATCHES = 4  # tokens in flight per container ≥ this × --max-batch-tokens keeps the GPU fed
REQUESTS_PER_SHARD = 2  # full requests each concurrent shard may keep in flight
JSON_BYTES_PER_TOKEN = 16  # generous: multi-byte UTF-8 and JSON escapes
TEI_MIN_PAYLOAD = 2_000_000  # TEI's default --payload-limit
TEI_MIN_PERMITS = 512  # TEI's default --max-concurrent-requests


@dataclass(frozen=True)
class RouterSettings:
    """The TEI router flags and container size derived from a Plan and its GPU."""

    cpu: float
    max_batch_tokens: int
    max_client_batch_size: int
    max_concurrent_requests: int
    payload_limit: int
    tokenization_workers: int
    client_max_requests: int

    def args(self, model_dir: str, served_name: str, revision: str | None) -> list[tuple[str, ...]]:
        """`text-embeddings-router` arguments, as (flag, value) pairs and bare flags, in a stable order.

        TEI's /info reports `--model-id` verbatim (the image's folder) and `--served-model-name` beside it, and
        `--revision` as `model_sha` (router/src/lib.rs, main.rs at v1.9.3): the client checks both against the plan.
        """
        return [
            ("--model-id", model_dir),
            ("--served-model-name", served_name),
            *((("--revision", revision),) if revision else ()),
            ("--hostname", TEI_HOST),
            ("--port", str(TEI_PORT)),
            ("--prometheus-port", str(TEI_PROMETHEUS_PORT)),
            ("--max-batch-tokens", str(self.max_batch_tokens)),
            ("--max-client-batch-size", str(self.max_client_batch_size)),
            ("--max-concurrent-requests", str(self.max_concurrent_requests)),
            ("--payload-limit", str(self.payload_limit)),
            ("--tokenization-workers", str(self.tokenization_workers)),
            # The client sends `truncate: false`, so an over-long chunk is still a 422, never silently cut; `true`
            # here only keeps long-context models (max input > --max-batch-tokens) from failing at startup.
            ("--auto-truncate", "true"),
            ("--json-output",),
        ]


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def router_settings(plan: Plan) -> RouterSettings:
    """Size TEI so `allow_concurrent_inputs` shards keep its queue full while texts in flight stay ≤ its permits."""
    cpu = plan.compute.embed.cpu
    size = max(1, plan.chunk.size)
    tokens = plan.embed.max_batch_tokens
    client_batch = min(MAX_CLIENT_BATCH, max(MIN_CLIENT_BATCH, tokens // size))
    permits = max(
        TEI_MIN_PERMITS,
        math.ceil(QUEUE_BATCHES * tokens / size),
        plan.compute.allow_concurrent_inputs * REQUESTS_PER_SHARD * client_batch,
    )
    permits = _round_up(permits, client_batch)
    text_bytes = size * JSON_BYTES_PER_TOKEN + len(plan.embed.prefix.encode("utf-8")) + 8
    payload = max(TEI_MIN_PAYLOAD, _round_up(client_batch * text_bytes + 4096, 1_000_000))
    return RouterSettings(
        cpu=cpu,
        max_batch_tokens=tokens,
        max_client_batch_size=client_batch,
        max_concurrent_requests=permits,
        payload_limit=payload,
        tokenization_workers=max(1, int(cpu) - 1),
        client_max_requests=max(16, REQUESTS_PER_SHARD * permits // client_batch),
    )


def input_work_seconds(plan: Plan) -> int:
    """The longest one stage input can run on Modal: every attempt to its timeout, plus the delays between them."""
    retries = plan.compute.retries
    delays = sum(min(RETRY_MAX_DELAY_S, RETRY_INITIAL_DELAY_S * RETRY_BACKOFF**i) for i in range(retries))
    return int((retries + 1) * plan.compute.timeout + delays)


def handover_after_seconds(plan: Plan) -> int:
    """When an orchestrator stops feeding: its timeout less the longest input's run (it drains) less a margin."""
    return ORCHESTRATE_TIMEOUT_S - input_work_seconds(plan) - HANDOVER_MARGIN_S


def embed_rate(plan: Plan) -> Rate:
    """The GPU's rate for the plan's model: this machine's calibration, else the catalog's (what units are cut by)."""
    return tei_rate(plan.model.ref, plan.compute.gpu)


def validate(plan: Plan) -> Rate:
    """Refuse a plan that cannot run well on Modal (before anything is created); returns the embed rate it is sized
    for. SpecError names the field to change: an input that cannot drain inside an orchestrator's 24 h, or an embed
    unit that cannot finish in half its timeout."""
    if plan.embed.endpoint:
        raise BackendError("embedding.endpoint names your own TEI server, but backend modal runs TEI on its own GPUs; "
                           "remove embedding.endpoint, or run with --backend local")
    compute = plan.compute
    work = input_work_seconds(plan)
    if handover_after_seconds(plan) < MIN_FEEDING_S:
        hours = ORCHESTRATE_TIMEOUT_S // 3600
        raise SpecError([SpecIssue(plan.spec_path, "compute.timeout",
                                   f"{compute.timeout:,} s × (compute.retries {compute.retries} + 1) attempts lets "
                                   f"one input run {work / 3600:.1f} h, which leaves a {hours} h orchestrator under "
                                   f"{MIN_FEEDING_S // 3600} h to feed inputs before it must drain them; lower "
                                   "compute.timeout or compute.retries")])
    rate = embed_rate(plan)
    check_fleet(plan, fleet_of(plan, rate.tokens_per_second), f"{rate.kind} rate")
    return rate


def tei_image(plan: Plan) -> tuple[str, str]:
    """(registry, tag) of the TEI image for the plan's GPU architecture, pinned to the catalog's patch release."""
    table = catalog.gpu_table()
    return str(table["tei_registry"]), f"{catalog.gpus()[plan.compute.gpu].tei_prefix}{table['tei_version']}"


def local_model_dir(plan: Plan) -> str | None:
    """The model folder on this machine when the spec names one (it is copied into the images), else None."""
    return plan.model.ref if Path(plan.model.ref).is_dir() else None


def upload_layout(plan: Plan) -> list[tuple[Path, str]]:
    """(local path, path relative to the Volume root) of every `dataset.files` entry of a `files` plan."""
    if plan.data.kind != "files" or not plan.data.files:
        return []
    paths = [Path(p) for p in plan.data.files]
    base = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [(p, f"{UPLOADS_DIR}/{plan.data.fingerprint}/{p.relative_to(base).as_posix()}") for p in paths]


def remote_plan(plan: Plan) -> dict[str, Any]:
    """The plan as the containers see it (JSON data): `dataset.files` at their uploaded copies on the Volume.

    Fingerprints are kept: they were computed from the local files, which the uploads copy byte for byte. (The
    model's files need no rewriting: the plan already names the images' copy, `plan.model.files_dir`.)
    """
    data = public_record(json.loads(json.dumps(plan.to_dict())))  # no credential is written into the app
    layout = upload_layout(plan)
    if layout:
        data["data"]["files"] = [f"{MODAL_ROOT}/{remote}" for _, remote in layout]
    return data


def literal(value: Any, indent: int = 0, lead: int = 0, width: int = 116) -> str:
    """A Python literal of JSON-like data: `repr()` when it fits on the line, else one item per line."""
    flat = repr(value)
    if indent + lead + len(flat) <= width or not value:
        return flat
    pad = " " * (indent + 4)
    if isinstance(value, str):  # implicit concatenation of pieces that each fit: the value is unchanged
        pieces = _split_text(value, width - indent - 4)
        return "(\n" + "\n".join(f"{pad}{piece!r}" for piece in pieces) + "\n" + " " * indent + ")"
    if not isinstance(value, (dict, list, tuple)):
        return flat
    if isinstance(value, dict):
        lines = [f"{pad}{k!r}: {literal(v, indent + 4, len(repr(k)) + 2, width)}," for k, v in value.items()]
        return "{\n" + "\n".join(lines) + "\n" + " " * indent + "}"
    lines = [f"{pad}{literal(v, indent + 4, 0, width)}," for v in value]
    return "[\n" + "\n".join(lines) + "\n" + " " * indent + "]"


def _split_text(text: str, width: int) -> list[str]:
    """Cut `text` into pieces whose reprs fit `width`, after whitespace where possible."""
    width = max(width, 16)
    pieces: list[str] = []
    current = ""
    for word in re.findall(r"\S*\s*", text):
        while word:
            if len(repr(current + word)) <= width:
                current, word = current + word, ""
            elif current:
                pieces.append(current)
                current = ""
            else:  # one word longer than the line: cut it where its repr reaches the width
                cut = 1
                while cut < len(word) and len(repr(word[: cut + 1])) <= width:
                    cut += 1
                pieces.append(word[:cut])
                word = word[cut:]
    if current:
        pieces.append(current)
    return pieces


def _router_args_literal(pairs: list[tuple[str, ...]]) -> str:
    lines = [" " * 4 + " ".join(f"{part!r}," for part in pair) for pair in pairs]
    return "[\n" + "\n".join(lines) + "\n]"


def _version() -> str:
    try:
        return importlib.metadata.version("volembed-runner")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def lease_run(plan: Plan) -> str:
    """The run's key in the workspace's lease Dict: its Volume and name (one writer per run)."""
    return f"{plan.volume}/{plan.name}"


def render_app(plan: Plan, prices: Path | None = None) -> str:
    """The generated app's source for `plan` (deterministic for a plan and this machine's calibrations); `prices`
    overrides the catalog's prices `compute.max_cost` is counted at."""
    rate = validate(plan)
    budget = budget_of(plan, load_prices(prices), rate.tokens_per_second)
    router = router_settings(plan)
    registry, tag = tei_image(plan)
    local = local_model_dir(plan)
    model_dir = str(plan.model.files_dir)
    compute = plan.compute
    values: dict[str, Any] = {
        "rendered_by": f"volembed-runner {_version()}",
        "app_name": plan.name,
        "volume_name": plan.volume,
        "root": MODAL_ROOT,
        "secret_names": list(plan.compute.secrets),
        "hub_secret_names": [plan.hub.secret] if plan.hub and plan.hub.secret else [],
        "python_version": PYTHON_VERSION,
        "cpu_packages": list(CPU_PACKAGES) + (list(INDEX_PACKAGES) if plan.index else []),
        "tei_packages": list(TEI_PACKAGES),
        "engine": "pylate" if plan.late is not None else "tei",
        "late_packages": list(LATE_PACKAGES),
        "pylate_package": PYLATE_PACKAGE,
        "late_model_files": LATE_MODEL_FILES,
        "tei_registry": registry,
        "tei_tag": tag,
        "model_id": plan.model.ref,
        "model_revision": plan.model.revision,
        "model_files": list(MODEL_FILE_PATTERNS),
        "tokenizer_files": list(TOKENIZER_FILES),
        "local_model": local,
        "model_dir": model_dir,
        "gpu": plan.compute.gpu,
        "embed_max_containers": plan.compute.concurrency_limit,
        "embed_max_inputs": plan.compute.allow_concurrent_inputs,
        "embed_tokens_per_second": round(rate.tokens_per_second),
        "embed_rate_kind": rate.kind,
        "embed_cpu": router.cpu,
        "embed_memory_mib": compute.embed.memory_mib,
        "embed_scaledown_s": compute.embed_scaledown_s,
        "embed_startup_timeout_s": compute.embed_startup_timeout_s,
        "router_ready_timeout_s": compute.embed_startup_timeout_s - ROUTER_READY_MARGIN_S,
        "tei_url": f"http://{TEI_HOST}:{TEI_PORT}",
        "tei_port": TEI_PORT,
        "tei_client": {"payload_limit": router.payload_limit, "max_requests_in_flight": router.client_max_requests},
        "chunk_max_containers": plan.compute.chunk_workers,
        "chunk_cpu": compute.chunk.cpu,
        "chunk_memory_mib": compute.chunk.memory_mib,
        "download_max_containers": compute.download_max_containers,
        "download_cpu": compute.download.cpu,
        "download_memory_mib": compute.download.memory_mib,
        "timeout_s": plan.compute.timeout,
        "retries": plan.compute.retries,
        "retry_initial_delay_s": RETRY_INITIAL_DELAY_S,
        "retry_backoff": RETRY_BACKOFF,
        "index_cpu": plan.index.cpu if plan.index else float(catalog.containers()["index"]["cpu"]),
        "index_memory_mib": (plan.index.memory_mib if plan.index
                             else int(catalog.containers()["index"]["memory_mib"])),
        "orchestrate_cpu": compute.orchestrator.cpu,
        "orchestrate_memory_mib": compute.orchestrator.memory_mib,
        "orchestrate_timeout_s": ORCHESTRATE_TIMEOUT_S,
        "handover_after_s": handover_after_seconds(plan),
        "lease_dict": LEASE_DICT,
        "lease_run": lease_run(plan),
        "input_work_s": input_work_seconds(plan),
        "max_passes": MAX_PASSES,
        "budget": budget.to_dict(),
    }
    literals = {key: literal(value, lead=len(key) + 3) for key, value in values.items()}
    literals["router_args"] = _router_args_literal(router.args(model_dir, plan.model.ref, plan.model.revision))
    literals["plan"] = literal(remote_plan(plan))
    template = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    return string.Template(template).substitute(literals)


def write_app(plan: Plan, path: Path, prices: Path | None = None) -> Path:
    """Render `plan` into `path` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_app(plan, prices), encoding="utf-8")
    return path
