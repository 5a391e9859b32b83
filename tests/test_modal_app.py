"""The generated Modal app, checked offline with the real `modal` package (reference/modal-sdk.md §2).

Layers: render → `py_compile` + `ruff check`; import under a no-network guard with Modal's deprecation warnings as
errors, then `Function.info()`; `app.deploy()` against the in-process fake control plane (`fake_modal.py`),
asserting on the recorded protos; `modal run <file> --help` in a subprocess. The containers' own code
(`runtime.py`: the `.map` adapter, the TEI launcher) is exercised here with stand-ins; what needs Modal's servers
(`.remote()`, `status`, `stop`) stays thin and is covered only up to the SDK call.

Snapshot: `tests/snapshots/app_wikipedia.py` is `pipelines/wikipedia.yaml` rendered (spec path and git commit
normalized). After an intended change to the template or the sizing, regenerate it and review the diff:

    VOLEMBED_UPDATE_SNAPSHOTS=1 pytest tests/test_modal_app.py -k snapshot
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import json
import os
import py_compile
import shutil
import socket
import subprocess
import sys
import textwrap
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import modal
import pytest
import yaml

from tests.fake_modal import Recorder, fake_modal_server
from volembed_runner import catalog, errors
from volembed_runner.backends.modal import launch, render, runtime
from volembed_runner.backends.modal.runtime import ModalMapper, ShardFailed, TEIRouter
from volembed_runner.errors import BackendError, SpecError
from volembed_runner.models import MODEL_FILE_PATTERNS
from volembed_runner.plan import MachineFacts, Plan, make_plan
from volembed_runner.spec import Spec

REPO = Path(__file__).resolve().parent.parent
SNAPSHOT = REPO / "tests" / "snapshots" / "app_wikipedia.py"
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
TEI_VERSION = catalog.gpu_table()["tei_version"]
TEI_REGISTRY = catalog.gpu_table()["tei_registry"]

# One spec per GPU family: (spec gpu, Modal gpu type, TEI image tag prefix).
GPU_FAMILIES = {
    "t4": ("T4", "T4", "turing-"),
    "a10g": ("A10G", "A10", "86-"),
    "l4": ("L4", "L4", "89-"),
    "a100": ("A100", "A100-40GB", ""),
    "h100": ("H100", "H100", "hopper-"),
}


def spec_dict(gpu: str, **embedding: Any) -> dict[str, Any]:
    return {
        "name": f"test-{gpu.lower()}",
        "backend": "modal",
        "volume": f"vol-{gpu.lower()}",
        "dataset": {"hf": "acme/corpus", "config": "en", "keep_columns": ["url"]},
        "chunking": {"size": 500, "overlap": 50, "workers": 7},
        "embedding": {"model": "BAAI/bge-small-en-v1.5", "revision": "0123456789abcdef", **embedding},
        "compute": {"gpu": gpu, "concurrency_limit": 3, "allow_concurrent_inputs": 5, "secrets": ["hf-token"],
                    "timeout": 1800, "retries": 2},
    }


def plan_from(d: dict[str, Any], folder: Path) -> Plan:
    return make_plan(Spec.model_validate(d), folder / "spec.yaml", backend="modal")


def pipeline_plan(path: Path) -> Plan:
    from volembed_runner.cli import _load

    return _load(path, None, backend="modal")


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    real = socket.socket.connect

    def deny(self: socket.socket, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network call attempted: {args}")

    socket.socket.connect = deny  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect = real  # type: ignore[method-assign]


def import_offline(source: str, path: Path) -> ModuleType:
    path.write_text(source, encoding="utf-8")
    with no_network(), warnings.catch_warnings():
        warnings.simplefilter("error", modal.exception.DeprecationError)
        return launch.import_app(path)


@dataclasses.dataclass
class Rendered:
    plan: Plan
    source: str
    path: Path
    module: ModuleType
    family: str | None = None


def modal_pipelines() -> list[Path]:
    """The shipped pipelines that can render for Modal: all but those whose model is local only (the demo ColBERT,
    refused with backend modal)."""
    from volembed_runner import catalog

    def local_only(path: Path) -> bool:
        known = catalog.find_model(yaml.safe_load(path.read_text(encoding="utf-8"))["embedding"]["model"])
        return known is not None and known.local_only

    return [p for p in sorted((REPO / "pipelines").glob("*.yaml")) if not local_only(p)]


def _all_plans(folder: Path) -> dict[str, tuple[Plan, str | None]]:
    plans: dict[str, tuple[Plan, str | None]] = {}
    for family, (gpu, _, _) in GPU_FAMILIES.items():
        plans[family] = (plan_from(spec_dict(gpu), folder), family)
    for path in modal_pipelines():
        plans[f"pipeline:{path.stem}"] = (pipeline_plan(path), None)
    return plans


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    folder = tmp_path_factory.mktemp("apps")
    out = {}
    for key, (plan, family) in _all_plans(folder).items():
        source = render.render_app(plan)
        path = folder / f"{key.replace(':', '_').replace('-', '_')}.py"
        out[key] = Rendered(plan, source, path, import_offline(source, path), family)
    return out


@pytest.fixture(scope="module")
def deployed(rendered: dict[str, Rendered]) -> dict[str, Recorder]:
    out = {}
    for key, r in rendered.items():
        with fake_modal_server() as rec:
            r.module.app.deploy()
        out[key] = rec
    return out


KEYS = [*GPU_FAMILIES, *(f"pipeline:{p.stem}" for p in modal_pipelines())]


# ── Import and Function.info(): no network, current API only ───────────────────────────────────────────────────────


@pytest.mark.parametrize("key", KEYS)
def test_app_imports_offline_and_exposes_its_stages(rendered: dict[str, Rendered], key: str) -> None:
    module = rendered[key].module
    assert set(module.STAGES) == {"download", "chunk", "embed", "index", "orchestrate"}
    assert module.STAGES["embed"] is module.Embedder


@pytest.mark.parametrize("key", KEYS)
def test_function_info_carries_gpu_timeouts_volume_and_concurrency(rendered: dict[str, Rendered], key: str) -> None:
    r = rendered[key]
    compute = r.plan.compute
    with no_network():
        infos = {name: (stage().embed if name == "embed" else stage).info() for name, stage in r.module.STAGES.items()}
    for name, info in infos.items():
        assert {p: v.name for p, v in info.volumes.items()} == {"/vol": r.plan.volume}, name
    embed = infos["embed"]
    assert embed.gpus == [(compute.gpu.upper(), 1)]
    assert embed.timeout == compute.timeout
    assert embed.startup_timeout == compute.embed_startup_timeout_s
    assert embed.concurrency_info is not None
    assert embed.concurrency_info.max_inputs == compute.allow_concurrent_inputs
    assert embed.max_retries == compute.retries
    # probe: `volembed-run calibrate` on Modal, which times TEI (a late-interaction job's PyLate Embedder has none)
    assert embed.method_names == (["embed"] if r.plan.late else ["embed", "probe"])
    for name in ("download", "chunk"):
        assert (infos[name].gpus, infos[name].timeout, infos[name].concurrency_info) == ([], compute.timeout, None)
    assert infos["orchestrate"].gpus == [] and infos["orchestrate"].timeout == 24 * 3600


@pytest.mark.parametrize("key", KEYS)
def test_generated_code_never_passes_removed_modal_parameters(rendered: dict[str, Rendered], key: str) -> None:
    removed = {"concurrency_limit", "allow_concurrent_inputs", "keep_warm", "container_idle_timeout"}
    tree = ast.parse(rendered[key].source)
    used = {kw.arg for node in ast.walk(tree) if isinstance(node, ast.Call) for kw in node.keywords}
    assert not used & removed
    assert "/data" not in {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)}


# ── Deploy against the fake control plane ────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("key", KEYS)
def test_deploy_sets_autoscaler_concurrency_and_gpu(rendered: dict[str, Rendered], deployed: dict[str, Recorder],
                                                    key: str) -> None:
    compute = rendered[key].plan.compute
    fns = deployed[key].functions()
    assert {"download", "chunk", "Embedder.*", "orchestrate"} <= set(fns)
    emb = fns["Embedder.*"]
    assert emb.autoscaler_settings.max_containers == compute.concurrency_limit
    assert emb.autoscaler_settings.scaledown_window == compute.embed_scaledown_s
    assert emb.max_concurrent_inputs == compute.allow_concurrent_inputs
    assert (emb.resources.gpu_config.gpu_type, emb.resources.gpu_config.count) == (compute.gpu.upper(), 1)
    assert emb.resources.milli_cpu == int(render.router_settings(rendered[key].plan).cpu * 1000)
    assert emb.retry_policy.retries == compute.retries
    assert fns["chunk"].autoscaler_settings.max_containers == compute.chunk_workers
    assert fns["download"].autoscaler_settings.max_containers == compute.download_max_containers <= 32
    assert fns["orchestrate"].timeout_secs == 24 * 3600
    assert not fns["chunk"].resources.HasField("gpu_config") or not fns["chunk"].resources.gpu_config.gpu_type


@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_tei_image_is_the_pinned_build_for_the_gpu_with_its_entrypoint_dropped(
    rendered: dict[str, Rendered], deployed: dict[str, Recorder], family: str
) -> None:
    _, gpu_type, prefix = GPU_FAMILIES[family]
    rec = deployed[family]
    lines = rec.dockerfile(rec.functions()["Embedder.*"].image_id)
    assert lines[0] == f"FROM {TEI_REGISTRY}:{prefix}{TEI_VERSION}"
    assert "ENTRYPOINT []" in lines
    install = next(line for line in lines if "uv pip install" in line)
    assert all(pkg in install.split() for pkg in render.TEI_PACKAGES)
    assert "torch" not in " ".join(lines)
    (build,) = build_steps(rec, "Embedder.*")
    assert "snapshot_download" in build.definition
    assert build_kwargs(build)["revision"] == "0123456789abcdef"  # the pinned revision goes into the weights step
    assert build_kwargs(build)["allow_patterns"] == list(MODEL_FILE_PATTERNS)


def build_steps(rec: Recorder, function: str) -> list[Any]:
    """The build functions (`Image.run_function`) in the image chain of one deployed function."""
    chain = rec.image_chain(rec.functions()[function].image_id)
    return [img.build_function for img in chain if img.HasField("build_function")]


def build_kwargs(build: Any) -> dict[str, Any]:
    from modal._serialization import deserialize

    _, kwargs = deserialize(build.input.args, None)
    return kwargs


@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_the_cpu_image_bakes_in_only_the_tokenizer_at_the_pinned_revision(deployed: dict[str, Recorder],
                                                                         family: str) -> None:
    rec = deployed[family]
    (build,) = build_steps(rec, "chunk")  # the chunk containers never download the model's weights
    kwargs = build_kwargs(build)
    assert kwargs["allow_patterns"] == kwargs["required"] == ["tokenizer.json"]
    assert kwargs["revision"] == "0123456789abcdef" and kwargs["repo_id"] == "BAAI/bge-small-en-v1.5"
    assert build_steps(rec, "orchestrate") == build_steps(rec, "download") == [build]  # one CPU image


@pytest.mark.parametrize("key", KEYS)
def test_each_image_imports_its_stage_code_in_a_block_of_its_own(rendered: dict[str, Rendered], key: str) -> None:
    # `with cpu_image.imports(), tei_image.imports():` would record a failed import on tei_image only, so a CPU
    # container would start without the names and fail later (modal 1.6.4 `_image.py` `imports`).
    blocks = [node for node in ast.walk(ast.parse(rendered[key].source)) if isinstance(node, ast.With)
              and any(_is_imports(item.context_expr) for item in node.items)]
    assert [len(b.items) for b in blocks] == [1, 1]
    assert sorted(ast.unparse(b.items[0].context_expr) for b in blocks) == ["cpu_image.imports()",
                                                                             "tei_image.imports()"]


def _is_imports(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "imports"


def test_the_entrypoint_spawns_the_orchestrator_so_a_detached_run_is_retried_server_side(
    rendered: dict[str, Rendered]
) -> None:
    # `.remote()` is retried by the caller's client, which `modal run --detach` leaves (modal 1.6.4 `_functions.py`).
    main = next(node for node in ast.walk(ast.parse(rendered["pipeline:wikipedia"].source))
                if isinstance(node, ast.FunctionDef) and node.name == "main")
    calls = {ast.unparse(node.func) for node in ast.walk(main) if isinstance(node, ast.Call)}
    assert "orchestrate.spawn" in calls and not any(call.endswith(".remote") for call in calls)


@pytest.mark.parametrize("key", KEYS)
def test_cpu_image_is_pinned_python_and_packages_without_torch(deployed: dict[str, Recorder], key: str) -> None:
    rec = deployed[key]
    lines = rec.dockerfile(rec.functions()["chunk"].image_id)
    assert lines[0].startswith(f"FROM python:{render.PYTHON_VERSION}.")
    install = next(line for line in lines if "uv pip install" in line)
    assert all(pkg in install.split() for pkg in render.CPU_PACKAGES)
    assert "torch" not in " ".join(lines)


@pytest.mark.parametrize("key", KEYS)
def test_deploy_mounts_one_v2_volume_at_vol_and_the_package_with_its_catalog(
    rendered: dict[str, Rendered], deployed: dict[str, Recorder], key: str
) -> None:
    rec, plan = deployed[key], rendered[key].plan
    (request,) = rec.requests("VolumeGetOrCreate")
    assert (request.deployment_name, request.version, request.object_creation_type) == (plan.volume, 2, 1)
    names = rec.volume_names()
    for fn in rec.functions().values():
        if fn.function_name != "download_weights":
            assert {m.mount_path: names[m.volume_id] for m in fn.volume_mounts} == {"/vol": plan.volume}
    files = {f.filename for r in rec.requests("MountGetOrCreate") for f in r.files}
    assert {"/root/volembed_runner/catalog/gpus.yaml", "/root/volembed_runner/backends/modal/runtime.py"} <= files
    assert not any(name.endswith(".tmpl") for name in files)


@pytest.mark.parametrize("key", KEYS)
def test_deploy_attaches_the_spec_secrets_by_name(rendered: dict[str, Rendered], deployed: dict[str, Recorder],
                                                   key: str) -> None:
    rec, secrets = deployed[key], list(rendered[key].plan.compute.secrets)
    assert sorted(r.deployment_name for r in rec.requests("SecretGetOrCreate")) == sorted(secrets)
    for name in ("download", "chunk", "Embedder.*", "orchestrate"):
        assert len(rec.functions()[name].secret_ids) == len(secrets)


# ── The rendered file itself ─────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed")
def test_rendered_files_compile_and_pass_ruff(rendered: dict[str, Rendered]) -> None:
    paths = [str(r.path) for r in rendered.values()]
    for path in paths:
        py_compile.compile(path, doraise=True)
    result = subprocess.run([RUFF, "check", "--no-cache", "--config", str(REPO / "pyproject.toml"), *paths],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_modal_run_help_works_offline(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    config = tmp_path / "modal.toml"
    config.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")} | {"MODAL_CONFIG_PATH": str(config)}
    result = subprocess.run([sys.executable, "-m", "modal", "run", str(rendered["h100"].path), "--help"],
                            capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--until" in result.stdout and "--no-wait" in result.stdout
    # modal 1.6 gives the options of a local entrypoint no help text (modal/cli/run.py `_add_click_options`); the
    # stages are the option's type, so --help lists them and Modal refuses any other
    assert "[all|download|chunk|embed]" in result.stdout


def test_rendering_is_deterministic(tmp_path: Path) -> None:
    plan = plan_from(spec_dict("L4"), tmp_path)
    assert render.render_app(plan) == render.render_app(Plan.from_dict(plan.to_dict()))


def _snapshot_plan() -> Plan:
    plan = pipeline_plan(REPO / "pipelines" / "wikipedia.yaml")
    # The machine facts are this machine's; the snapshot fixes them so that it reads the same on every machine.
    return dataclasses.replace(plan, spec_path="pipelines/wikipedia.yaml", git={"commit": None, "dirty": None},
                               machine=MachineFacts(cores=2, native_bf16=False))


def test_snapshot_of_the_wikipedia_app() -> None:
    source = render.render_app(_snapshot_plan())
    if os.environ.get("VOLEMBED_UPDATE_SNAPSHOTS"):
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(source, encoding="utf-8")
    assert SNAPSHOT.is_file(), "no snapshot yet: run with VOLEMBED_UPDATE_SNAPSHOTS=1"
    assert source == SNAPSHOT.read_text(encoding="utf-8"), (
        "the rendered app changed: review, then regenerate with VOLEMBED_UPDATE_SNAPSHOTS=1")


# ── Values enter only as literals ────────────────────────────────────────────────────────────────────────────────

HOSTILE = 'x"; import os; os.system("echo pwned") #\n"""\n{}{PLAN}${name}\\\'\'\'\r\x00é😀'


def _shape(source: str) -> str:
    """The module's AST with every constant blanked: equal shapes mean the values could not change the code."""

    class Blank(ast.NodeTransformer):
        def visit_Constant(self, node: ast.Constant) -> ast.Constant:
            return ast.Constant(value=None)

    return ast.dump(Blank().visit(ast.parse(source)))


def _literals(source: str) -> dict[str, Any]:
    """The module's upper-case assignments whose values are literals."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper():
            with contextlib.suppress(ValueError):
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def test_hostile_spec_values_render_as_data_not_code(tmp_path: Path) -> None:
    benign_spec = spec_dict("A10G")
    benign_spec["chunking"]["size"] = 400  # room for the prefix
    benign = plan_from(benign_spec, tmp_path)
    d = spec_dict("A10G", prefix=HOSTILE)
    d["chunking"]["size"] = 400
    d["dataset"] = {"hf": HOSTILE, "config": HOSTILE, "text_template": "{title}" + HOSTILE, "keep_columns": [HOSTILE]}
    hostile = plan_from(d, tmp_path)
    source = render.render_app(hostile)
    path = tmp_path / "hostile.py"
    path.write_text(source, encoding="utf-8")
    py_compile.compile(str(path), doraise=True)
    assert _shape(source) == _shape(render.render_app(benign))
    module = import_offline(source, path)
    assert module.PLAN["embed"]["prefix"] == HOSTILE
    assert module.PLAN["data"]["hf"] == HOSTILE
    assert Plan.from_dict(module.PLAN).data == hostile.data


def test_values_that_bypass_spec_validation_still_render_as_data(tmp_path: Path) -> None:
    plan = plan_from(spec_dict("T4"), tmp_path)
    compute = dataclasses.replace(plan.compute, gpu="T4", secrets=(HOSTILE,))
    evil = dataclasses.replace(plan, name=HOSTILE, volume=HOSTILE, compute=compute)
    source = render.render_app(evil)
    compile(source, "evil.py", "exec")
    assert _shape(source) == _shape(render.render_app(plan))
    values = _literals(source)
    assert values["APP_NAME"] == HOSTILE and values["VOLUME_NAME"] == HOSTILE and values["SECRET_NAMES"] == [HOSTILE]
    assert values["PLAN"]["name"] == HOSTILE


def test_long_strings_are_split_without_changing_them() -> None:
    text = "word " * 60 + "x" * 300 + "\n\"'é😀"
    out = render.literal({"k": [text]}, indent=0)
    assert ast.literal_eval(out) == {"k": [text]}
    assert max(len(line) for line in out.splitlines()) <= 120


# ── Router sizing ────────────────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_router_flags_are_explicit_and_sized_for_the_gpu(tmp_path: Path, family: str) -> None:
    plan = plan_from(spec_dict(GPU_FAMILIES[family][0]), tmp_path)
    s = render.router_settings(plan)
    args = dict(pair if len(pair) == 2 else (pair[0], "") for pair in s.args("/models/m", "org/m", None))
    for flag in ("--model-id", "--port", "--hostname", "--max-batch-tokens", "--max-client-batch-size",
                 "--max-concurrent-requests", "--payload-limit", "--tokenization-workers", "--json-output",
                 "--auto-truncate", "--prometheus-port"):
        assert flag in args
    assert args["--hostname"] == "127.0.0.1" and args["--model-id"] == "/models/m"
    assert int(args["--max-batch-tokens"]) == plan.embed.max_batch_tokens
    size, inputs = plan.chunk.size, plan.compute.allow_concurrent_inputs
    # Every concurrent shard can keep two full requests in flight without exceeding TEI's permits...
    assert inputs * 2 * s.max_client_batch_size <= s.max_concurrent_requests
    # ...and the texts in flight hold several GPU batches' worth of tokens.
    assert s.max_concurrent_requests * size >= 4 * s.max_batch_tokens
    assert s.payload_limit >= s.max_client_batch_size * size * render.JSON_BYTES_PER_TOKEN
    assert 1 <= s.tokenization_workers < s.cpu


def test_a_local_model_folder_is_copied_into_the_images(tmp_path: Path) -> None:
    model = tmp_path / "my-model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (model / name).write_text("{}")
    plan = plan_from(spec_dict("L4", model=str(model), revision=None), tmp_path)
    module = import_offline(render.render_app(plan), tmp_path / "local_model_app.py")
    local, inside = module.LOCAL_MODEL, module.MODEL_DIR
    assert (local, inside) == (str(model), "/models/my-model")
    assert module.PLAN["model"]["files_dir"] == "/models/my-model"
    assert module.ROUTER_ARGS[:2] == ["--model-id", "/models/my-model"]
    with fake_modal_server() as rec:
        module.app.deploy()
    assert not any(img.HasField("build_function") for img in rec._images.values())  # nothing fetched from the Hub
    mounts = [{f.filename for f in r.files} for r in rec.requests("MountGetOrCreate")]
    tei_files = {f"/models/my-model/{name}" for name in ("config.json", "tokenizer.json", "model.safetensors")}
    assert tei_files in mounts  # the TEI image gets the weights...
    assert tei_files - {"/models/my-model/model.safetensors"} in mounts  # ...the CPU image only the tokenizer


def test_inputs_that_could_outlast_the_orchestrator_are_refused_naming_timeout_and_retries(tmp_path: Path) -> None:
    d = spec_dict("A10G")
    d["compute"].update(timeout=21_600, retries=3)  # 4 attempts of 6 h: one input could run the whole 24 h
    with pytest.raises(SpecError) as refused:
        render.render_app(plan_from(d, tmp_path))
    message = str(refused.value)
    assert "compute.timeout" in message and "compute.retries" in message and "\n" not in message


@pytest.mark.parametrize("key", KEYS)
def test_the_hand_over_leaves_the_longest_input_time_to_drain(rendered: dict[str, Rendered], key: str) -> None:
    module = rendered[key].module
    assert render.input_work_seconds(rendered[key].plan) == module.INPUT_WORK_S
    assert module.HANDOVER_AFTER_S + module.INPUT_WORK_S + render.HANDOVER_MARGIN_S <= module.ORCHESTRATE_TIMEOUT_S
    assert module.HANDOVER_AFTER_S >= render.MIN_FEEDING_S


def test_an_embed_unit_that_cannot_fit_half_its_timeout_is_refused_before_rendering(tmp_path: Path) -> None:
    d = spec_dict("T4", model="nomic-ai/nomic-embed-text-v1.5", revision=None)
    d["compute"].update(timeout=60, allow_concurrent_inputs=8)
    with pytest.raises(SpecError, match="compute.timeout"):
        render.render_app(plan_from(d, tmp_path))
    d["compute"].update(timeout=3600)
    render.render_app(plan_from(d, tmp_path))  # fineweb's model on a T4 with the default timeout: units fit


def test_a_model_the_pinned_tei_cannot_load_at_main_gets_the_catalogs_known_good_commit(tmp_path: Path) -> None:
    pinned = catalog.find_model("nomic-ai/nomic-embed-text-v1.5").tei_revision
    assert pinned and len(pinned) == 40
    plan = plan_from(spec_dict("A10G", model="nomic-ai/nomic-embed-text-v1.5", revision=None), tmp_path)
    assert plan.model.revision == pinned and "catalog" in plan.model.revision_source
    assert literal_of(render.render_app(plan), "MODEL_REVISION") == pinned  # what the image build step fetches
    with pytest.raises(SpecError) as refused:
        plan_from(spec_dict("A10G", model="nomic-ai/nomic-embed-text-v1.5", revision="main"), tmp_path)
    message = str(refused.value)
    assert "embedding.revision" in message and pinned in message and "#927" in message and "\n" not in message
    own = "e" * 40  # a commit of the user's own choosing is theirs to pin
    chosen = plan_from(spec_dict("A10G", model="nomic-ai/nomic-embed-text-v1.5", revision=own), tmp_path)
    assert chosen.model.revision == own and chosen.model.revision_source is None
    shipped = pipeline_plan(REPO / "pipelines" / "fineweb-edu-10bt.yaml")
    assert shipped.model.revision == pinned and not shipped.warnings


def literal_of(source: str, name: str) -> Any:
    return _literals(source)[name]


# The Volumes Modal's own tutorials create (v1): a spec sharing a name would fail at deploy.
TUTORIAL_VOLUMES = {"embedding-wikipedia", "embedding-model-cache", "embeddings", "datasets"}


def test_shipped_specs_leave_sharding_to_the_fleet_and_use_volumes_of_their_own() -> None:
    for path in sorted((REPO / "pipelines").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        if spec.get("backend") == "modal":
            assert "shard_rows" not in spec["dataset"], path.name
            assert spec["volume"] not in TUTORIAL_VOLUMES, path.name


def test_endpoint_specs_are_refused_for_modal(tmp_path: Path) -> None:
    plan = plan_from(spec_dict("L4", endpoint="http://tei.internal:8080"), tmp_path)
    with pytest.raises(BackendError, match="endpoint"):
        render.render_app(plan)


# ── Files datasets: uploaded, and the plan rewritten to their Volume paths ─────────────────────────────────────────


class FakeVolume:
    """Stands in for modal.Volume: listdir / batch_upload / read_file."""

    def __init__(self, existing: dict[str, int] | None = None, files: dict[str, bytes] | None = None) -> None:
        self.existing = existing or {}
        self.files = files or {}
        self.uploaded: list[tuple[str, str]] = []

    def listdir(self, path: str, recursive: bool = False) -> list[Any]:
        if not self.existing:
            raise modal.exception.NotFoundError(path)
        return [dataclasses.make_dataclass("E", ["path", "size"])(p, s) for p, s in self.existing.items()]

    @contextlib.contextmanager
    def batch_upload(self, force: bool = False) -> Iterator[Any]:
        outer = self

        class Batch:
            def put_file(self, local: str, remote: str) -> None:
                outer.uploaded.append((local, remote))

        yield Batch()

    def read_file(self, path: str) -> Iterator[bytes]:
        if path not in self.files:
            raise modal.exception.NotFoundError(path)
        yield self.files[path]


def _files_plan(tmp_path: Path) -> Plan:
    data = tmp_path / "data"
    (data / "docs").mkdir(parents=True)
    (data / "a.jsonl").write_text('{"text": "hello"}\n')
    (data / "docs" / "one.txt").write_text("one")
    (data / "docs" / "two.md").write_text("two two")
    d = spec_dict("L4")
    d["dataset"] = {"files": [str(data / "a.jsonl"), str(data / "docs")]}
    return plan_from(d, tmp_path)


def test_files_plans_point_the_containers_at_the_uploaded_copies(tmp_path: Path) -> None:
    plan = _files_plan(tmp_path)
    fp = plan.data.fingerprint
    assert [remote for _, remote in render.upload_layout(plan)] == [f"uploads/{fp}/a.jsonl", f"uploads/{fp}/docs"]
    remote = render.remote_plan(plan)
    assert remote["data"]["files"] == [f"/vol/uploads/{fp}/a.jsonl", f"/vol/uploads/{fp}/docs"]
    assert remote["data"]["fingerprint"] == fp


def test_upload_skips_files_already_on_the_volume_with_the_same_size(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _files_plan(tmp_path)
    fp = plan.data.fingerprint
    vol = FakeVolume(existing={f"uploads/{fp}/a.jsonl": len('{"text": "hello"}\n'),
                               f"uploads/{fp}/docs/one.txt": 999})
    monkeypatch.setattr(modal.Volume, "from_name", lambda *a, **k: vol)
    told: list[tuple[int, str]] = []
    assert launch.upload_files(plan, lambda n, where: told.append((n, where))) == 2
    assert told == [(2, f"{plan.volume}:/uploads/{fp}")]
    assert sorted(remote for _, remote in vol.uploaded) == [f"/uploads/{fp}/docs/one.txt",
                                                            f"/uploads/{fp}/docs/two.md"]


# ── Credentials, status, stop ──────────────────────────────────────────────────────────────────────────────────────


def _offline_env(tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "empty-modal.toml"
    config.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    return env | {"MODAL_CONFIG_PATH": str(config), "VOLEMBED_HOME": str(tmp_path / "home"),
                  "PYTHONPATH": str(REPO)}


def test_run_without_credentials_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        from pathlib import Path
        from volembed_runner.backends.modal import launch
        from volembed_runner.cli import _load
        from volembed_runner.errors import BackendError
        plan = _load(Path({str(REPO / 'pipelines' / 'wikipedia.yaml')!r}), None, backend="modal")
        try:
            launch.run(plan, until=None, detach=False)
        except BackendError as exc:
            print("BackendError:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=_offline_env(tmp_path), timeout=60)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("BackendError: no Modal credentials"), result.stdout + result.stderr
    assert "modal setup" in lines[0] and "MODAL_TOKEN_ID" in lines[0] and "MODAL_TOKEN_SECRET" in lines[0]
    assert not (tmp_path / "home").exists()


def test_status_without_credentials_exits_4_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from volembed_runner.cli import main; main()", "status",
         str(REPO / "pipelines" / "wikipedia.yaml")],
        capture_output=True, text=True, env=_offline_env(tmp_path), timeout=60)
    assert result.returncode == 4
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: no Modal credentials")


def test_detached_run_deploys_under_the_job_name_and_spawns_the_orchestrator(tmp_path: Path) -> None:
    plan = pipeline_plan(REPO / "pipelines" / "wikipedia.yaml")
    with fake_modal_server() as rec:
        launched = launch.run(plan, until="chunk", detach=True)
    assert launched.detached and launched.app_id and launched.call_id
    folder = launch.build_dir(plan)
    assert (folder / "app.py").read_text(encoding="utf-8") == render.render_app(plan)
    assert [r.name for r in rec.requests("AppPublish")] == [plan.name]
    (call,) = rec.requests("FunctionMap")
    orchestrate_id = next(r.existing_function_id for r in rec.requests("FunctionCreate")
                          if r.function.function_name == "orchestrate")
    assert call.function_id == orchestrate_id
    assert b"chunk" in call.pipelined_inputs[0].input.args  # --until reaches the orchestrator
    record = json.loads((folder / launch.RUN_RECORD).read_text())
    assert record["deployed"] is True and record["app_id"] and record["call_id"]


def test_auth_error_from_modal_becomes_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(launch, "has_credentials", lambda: True)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise modal.exception.AuthError("Token invalid.\nsee docs")

    monkeypatch.setattr(modal.Volume, "from_name", refuse)
    plan = plan_from(spec_dict("L4"), tmp_path)
    with pytest.raises(BackendError) as caught:
        launch.status(plan)
    assert "\n" not in str(caught.value) and "modal setup" in str(caught.value)


def test_status_reads_the_manifest_from_the_volume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plan = plan_from(spec_dict("L4"), tmp_path)
    manifest = {"name": plan.name, "status": "running", "passes": 1,
                "stages": {"chunk": {"total": 3, "done": 2, "skipped": 0, "failed": {"00002": "StageError: bad"}}}}
    vol = FakeVolume(files={f"/runs/{plan.name}/manifest.json": json.dumps(manifest).encode()})
    monkeypatch.setattr(launch, "has_credentials", lambda: True)
    monkeypatch.setattr(modal.Volume, "from_name", lambda *a, **k: vol)
    assert launch.status(plan) == manifest
    monkeypatch.setattr(modal.Volume, "from_name", lambda *a, **k: FakeVolume())
    with pytest.raises(BackendError, match="has not started"):
        launch.status(plan)


def test_status_command_prints_stages_and_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from volembed_runner import cli

    manifest = {"name": "wikipedia-bge-base", "status": "running", "passes": 2, "updated_at": "now",
                "stages": {"chunk": {"total": 3, "done": 2, "skipped": 1, "failed": {"00002": "StageError: bad"},
                                     "seconds": 1.5}},
                "totals": {"chunks": 1234}}
    monkeypatch.setattr(launch, "status", lambda plan: manifest)
    result = CliRunner().invoke(cli.app, ["status", str(REPO / "pipelines" / "wikipedia.yaml")])
    assert result.exit_code == 0, result.output
    assert "running (pass 2" in result.output and "failed: chunk 00002: StageError: bad" in result.output
    assert "chunks 1,234" in result.output
    as_json = CliRunner().invoke(cli.app, ["status", str(REPO / "pipelines" / "wikipedia.yaml"), "--json"])
    assert json.loads(as_json.output) == manifest


def test_render_command_writes_the_app(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from volembed_runner import cli

    out = tmp_path / "app.py"
    result = CliRunner().invoke(cli.app, ["render", str(REPO / "pipelines" / "wikipedia.yaml"), "-o", str(out),
                                          "--set", "compute.gpu=H100"])
    assert result.exit_code == 0, result.output
    assert "TEI_TAG = 'hopper-" in out.read_text()


def test_stop_uses_the_recorded_app_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plan = plan_from(spec_dict("L4"), tmp_path)
    launch._record_run(launch.build_dir(plan), plan, app_id="ap-123", deployed=False, call_id=None)
    stopped = []

    class Handle:
        app_id = "ap-123"

        def stop(self) -> None:
            stopped.append(self.app_id)

    monkeypatch.setattr(launch, "has_credentials", lambda: True)
    monkeypatch.setattr(modal.App, "lookup", lambda ident, **k: Handle() if ident == "ap-123" else None)
    assert launch.stop(plan) == "ap-123" and stopped == ["ap-123"]


# ── ModalMapper: lazy feeding, results paired with inputs under order_outputs=False ────────────────────────────────


class FakeFunction:
    """A stand-in for a Modal Function's `.starmap.aio`: pulls its inputs in a task of its own, as fast as the caller
    yields them (as modal 1.6.4's `_map_helper.feed_queue` does), answers each with the next of `results`
    (completion order; by default `{"key", "result"}`; none left: the map ends), and records what it got."""

    def __init__(self, results: list[Any] | None = None) -> None:
        self.results = results
        self.inputs: list[tuple[Any, ...]] = []
        self.kwargs: dict[str, Any] = {}
        self.starmap = types.SimpleNamespace(aio=self._starmap)

    async def _starmap(self, inputs: Any, **kwargs: Any) -> Any:
        self.kwargs = kwargs
        results = iter(self.results) if self.results is not None else None
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:
            async for args in inputs:
                self.inputs.append(args)
                await queue.put(args)
            await queue.put(None)

        task = asyncio.create_task(pump())
        try:
            while (args := await queue.get()) is not None:
                if results is None:
                    yield {"key": str(args[0]), "result": {"args": list(args)}}
                elif (result := next(results, None)) is not None:
                    yield result
                else:
                    return
        finally:
            task.cancel()


class FakeVolumeSync:
    def __init__(self) -> None:
        self.log: list[str] = []

    def commit(self) -> None:
        self.log.append("commit")

    def reload(self) -> None:
        self.log.append("reload")


WIDE = runtime.Windows(download=100, chunk=100, embed=100)


@dataclasses.dataclass
class Task:
    index: int

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index}


def test_mapper_pairs_out_of_order_results_with_their_inputs() -> None:
    chunk = FakeFunction([
        {"key": "00002", "result": {"chunks": 2}},
        ShardFailed("00000", "OSError: volume busy"),
        {"key": "00001", "error": "StageError: broken shard"},
    ])
    vol = FakeVolumeSync()
    mapper = ModalMapper(download=FakeFunction([]), chunk=chunk, embed=FakeFunction([]), windows=WIDE, volume=vol)
    pairs = list(mapper.chunk(iter([("00000", None), ("00001", 10), ("00002", None)])))
    assert [p[0] for p in pairs] == ["00002", "00000", "00001"]
    assert pairs[0][1] == {"chunks": 2}
    assert isinstance(pairs[1][1], ShardFailed) and str(pairs[1][1]) == "OSError: volume busy"
    assert isinstance(pairs[2][1], ShardFailed) and str(pairs[2][1]) == "StageError: broken shard"
    assert chunk.inputs == [("00000", None), ("00001", 10), ("00002", None)]
    assert chunk.kwargs == {"order_outputs": False, "return_exceptions": True}
    assert vol.log == ["commit", "reload"]  # commit does not reload when the server says so: reload explicitly


def test_mapper_gives_keyless_failures_to_the_inputs_left_without_a_result() -> None:
    timeout = modal.exception.FunctionTimeoutError("timed out")
    embed = FakeFunction([{"key": "b", "result": {"rows": 1}}, timeout])
    mapper = ModalMapper(download=FakeFunction([]), chunk=FakeFunction([]), embed=embed, windows=WIDE)
    pairs = dict(mapper.embed(iter(["a", "b"])))
    assert pairs["b"] == {"rows": 1} and pairs["a"] is timeout

    lost = RuntimeError("container lost")
    embed = FakeFunction([timeout, lost, {"key": "b", "result": {}}])
    mapper = ModalMapper(download=FakeFunction([]), chunk=FakeFunction([]), embed=embed, windows=WIDE)
    pairs = dict(mapper.embed(iter(["a", "b", "c"])))
    assert pairs["b"] == {}
    for shard in ("a", "c"):  # two keyless failures with different causes: both failed, causes not attributable
        assert isinstance(pairs[shard], ShardFailed) and "without an input id" in str(pairs[shard])

    embed = FakeFunction([{"key": "a", "result": {}}])  # fewer results than inputs: the rest failed
    mapper = ModalMapper(download=FakeFunction([]), chunk=FakeFunction([]), embed=embed, windows=WIDE)
    pairs = dict(mapper.embed(iter(["a", "b"])))
    assert isinstance(pairs["b"], ShardFailed)


def test_mapper_keys_download_tasks_by_position_and_never_maps_nothing() -> None:
    download = FakeFunction([{"key": "1", "result": ["00003"]}, {"key": "0", "result": ["00000", "00001"]}])
    empty = FakeFunction([])
    vol = FakeVolumeSync()
    mapper = ModalMapper(download=download, chunk=empty, embed=empty, windows=WIDE, volume=vol)
    tasks = [Task(0), Task(1)]
    pairs = list(mapper.download(iter(tasks)))
    assert pairs == [(tasks[1], ["00003"]), (tasks[0], ["00000", "00001"])]
    assert download.inputs == [("0", {"index": 0}), ("1", {"index": 1})]
    assert list(mapper.chunk(iter([]))) == [] and list(mapper.embed(iter([]))) == []
    assert empty.inputs == [] and empty.kwargs == {} and vol.log == ["commit", "reload"]


def test_mapper_pulls_inputs_only_as_its_window_has_room_and_stops_with_the_feed() -> None:
    pulled: list[str] = []
    stop_after = 7

    def feed() -> Iterator[str]:
        for i in range(100):
            if len(pulled) >= stop_after:  # the orchestrator's deadline: the feed says no more
                return
            pulled.append(f"u{i}")
            yield f"u{i}"

    embed = FakeFunction()  # a fleet that would take everything at once
    mapper = ModalMapper(download=FakeFunction(), chunk=FakeFunction(),
                         embed=embed, windows=runtime.Windows(download=1, chunk=1, embed=3))
    seen = []
    for unit, result in mapper.embed(feed()):
        seen.append(unit)
        assert len(pulled) - len(seen) <= 3  # never more than the window in flight
        assert result == {"args": [unit]}
    assert seen == pulled == [f"u{i}" for i in range(stop_after)]  # every fed input drained, none after the stop


def test_shard_errors_return_deterministic_failures_and_raise_transient_ones() -> None:
    import pickle

    from volembed_runner.errors import EmbedderError, EmbedderUnavailable, SourceError, StageError

    for deterministic in (SourceError("bad row 3\nmore detail"), StageError("not chunked"),
                          EmbedderError("TEI rejected text 4: HTTP 422: too long"), ValueError("a bug")):
        with runtime.shard_errors("00007") as reply:
            raise deterministic
        assert reply.to_dict() == {"key": "00007", "error": errors.describe(deterministic),
                                   "exit_code": getattr(deterministic, "exit_code", 1)}  # 3 for the bad row
    for transient in (OSError("volume busy"), TimeoutError("read timed out"),
                      EmbedderUnavailable("TEI failed text 0 after 7 attempts: HTTP 503")):
        with pytest.raises(ShardFailed) as caught, runtime.shard_errors("00007"):
            raise transient
        again = pickle.loads(pickle.dumps(caught.value))
        assert (again.key, str(again), again.exit_code) == ("00007", errors.describe(transient), None)
    with runtime.shard_errors("00007") as reply:
        reply.result = {"rows": 3}
    assert reply.to_dict() == {"key": "00007", "result": {"rows": 3}}


def test_follow_handovers_waits_through_the_chain() -> None:
    chain = {"fc-1": {"ok": False, "next_call": "fc-2"}, "fc-2": {"ok": True, "next_call": None}}
    assert runtime.follow_handovers({"next_call": "fc-1"}, chain.__getitem__) == chain["fc-2"]


# ── TEI router launcher ──────────────────────────────────────────────────────────────────────────────────────────

FAKE_ROUTER = """
import socket, sys, time
print("starting", flush=True)
if sys.argv[1] == "exit":
    print("Error: could not load model", flush=True)
    sys.exit(3)
if sys.argv[1] == "cpu":
    print("Could not find a compatible CUDA device on host. Using CPU instead", flush=True)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[2]))); s.listen()
print("Ready", flush=True)
time.sleep(60)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_router(tmp_path: Path) -> tuple[str, ...]:
    script = tmp_path / "router.py"
    script.write_text(FAKE_ROUTER)
    return (sys.executable, str(script))


def test_router_start_waits_for_the_port_and_stop_ends_it(fake_router: tuple[str, ...]) -> None:
    port = _free_port()
    router = TEIRouter.start(["ok", str(port)], port=port, timeout=20, executable=fake_router, poll_s=0.05)
    assert router.proc.poll() is None and runtime.port_open("127.0.0.1", port)
    router.stop()
    assert router.proc.poll() is not None and "Ready" in router.last_lines()


def test_router_that_exits_fails_fast_with_its_log(fake_router: tuple[str, ...]) -> None:
    with pytest.raises(RuntimeError, match="exited with code 3.*could not load model"):
        TEIRouter.start(["exit", "0"], port=_free_port(), timeout=20, executable=fake_router, poll_s=0.05)


def test_router_that_falls_back_to_cpu_is_refused(fake_router: tuple[str, ...]) -> None:
    port = _free_port()
    with pytest.raises(RuntimeError, match="fell back to the CPU"):
        TEIRouter.start(["cpu", str(port)], port=port, timeout=20, executable=fake_router, poll_s=0.05)


def test_router_env_adds_cuda_compat_only_for_older_drivers() -> None:
    old = "| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: 12.8     |"
    new = "| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06   CUDA Version: 13.0     |"
    umd = "| NVIDIA-SMI 610.1   Driver Version: 610.1   CUDA UMD Version: 13.2 |"
    assert runtime.router_env({"LD_LIBRARY_PATH": "/x"}, old)["LD_LIBRARY_PATH"] == "/usr/local/cuda/compat:/x"
    assert runtime.router_env({"LD_LIBRARY_PATH": "/x"}, new)["LD_LIBRARY_PATH"] == "/x"
    assert runtime.router_env({}, umd) == runtime.router_env({}, None) == {"LOG_LEVEL": "warn"}


def test_the_router_logs_at_warn_so_requests_are_not_each_a_log_line(fake_router: tuple[str, ...],
                                                                    tmp_path: Path) -> None:
    script = tmp_path / "env_router.py"
    script.write_text("import os, sys\nprint('LOG_LEVEL=' + os.environ.get('LOG_LEVEL', ''), flush=True)\n"
                      "sys.exit(3)\n")
    with pytest.raises(RuntimeError, match="LOG_LEVEL=warn"):
        TEIRouter.start([], port=_free_port(), timeout=20, executable=(sys.executable, str(script)), env={},
                        poll_s=0.05)
    assert runtime.router_env({"LOG_LEVEL": "debug"}, None)["LOG_LEVEL"] == "debug"  # a deliberate choice stays
