"""Publishing a run on the Hub, against the loopback Hub stand-in (`tests/hub_server.py`), on both backends' paths:
`volembed-run push` and `output.hub` locally, and the generated Modal app's `push` function run in-process with
`.local()` over a folder Volume (and registered, with its Secret, when the app deploys to the fake control plane).

huggingface_hub reads its endpoint and offline switch at import, so the fixture sets them on `huggingface_hub.constants`
(what `HF_ENDPOINT` and `HF_HUB_OFFLINE=0` set in a fresh process) and turns off the Xet transfer, which the
stand-in does not serve (see its docstring).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import DatasetCard

from tests.fake_modal import fake_modal_server
from volembed_runner import store
from volembed_runner.backends.modal import launch, render
from volembed_runner.cli import app
from volembed_runner.loading import load_spec
from volembed_runner.plan import Plan, make_plan
from volembed_runner.results import LocalVolume, current_outputs, finished_files

from .after_run import SPEC
from .hub_server import HubServer
from .test_modal_stages_local import FolderVolume
from .test_results import cli, runner

TOKEN = "hf_test_token"
REPO = "acme/after-vectors"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    from huggingface_hub import constants

    with HubServer(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


@pytest.fixture
def run(finished_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Plan]:
    spec, home = finished_run
    shutil.copytree(home, tmp_path / "home")
    monkeypatch.setenv("VOLEMBED_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return spec, make_plan(load_spec(spec), spec)


def current_files(plan: Plan, root: Path) -> dict[str, bytes]:
    """What a push must upload: repository path → bytes of the run's current chunk and embedding files."""
    outputs = current_outputs(plan, root)
    out = {}
    for folder in ("chunks", "embeddings"):
        for e in finished_files(LocalVolume(root), outputs.folders[folder]):
            out[f"{folder}/{Path(e.path).name}"] = (root / e.path).read_bytes()
    return out


def check_published(server: HubServer, plan: Plan, root: Path, *, license_id: str) -> DatasetCard:
    repo = server.repo(REPO)
    want = current_files(plan, root)
    assert {p: repo.files[p] for p in want} == want  # byte for byte
    assert all(p in repo.lfs for p in want)  # parquet goes to LFS, as the Hub's .gitattributes says
    card = DatasetCard(repo.files["README.md"].decode())
    configs = {c["config_name"]: c for c in card.data.configs}
    assert configs["embeddings"]["default"] is True
    assert configs["embeddings"]["data_files"] == [{"split": "train", "path": "embeddings/*.parquet"}]
    assert configs["chunks"]["data_files"] == [{"split": "train", "path": "chunks/*.parquet"}]
    assert card.data.license == license_id
    assert plan.model.ref in card.text and f"{plan.chunk.size} tokens" in card.text
    assert f"{plan.chunk.overlap}" in card.text and "name: after" in card.text  # the spec itself
    return card


def test_push_uploads_the_current_files_and_a_card_that_loads(run, hub: HubServer, tmp_path: Path) -> None:
    from datasets import load_dataset

    spec, plan = run
    result = runner.invoke(app, ["push", str(spec), "--repo", REPO, "--license", "cc-by-sa-4.0", "--json"])
    assert result.exit_code == 0, result.output
    pushed = json.loads(result.stdout)  # upload progress goes to stderr
    assert pushed["repo"] == REPO and pushed["url"].endswith(f"/datasets/{REPO}") and pushed["commit"]
    card = check_published(hub, plan, plan.local_root(), license_id="cc-by-sa-4.0")
    manifest = json.loads(store.manifest_path(plan.local_root(), plan.name).read_text())
    assert f"{manifest['totals']['vectors']:,} vectors" in card.text

    # the repository as a folder: `load_dataset` follows the card's configs to the vectors and the chunks
    copy = tmp_path / "repo"
    for path, data in hub.repo(REPO).files.items():
        (copy / path).parent.mkdir(parents=True, exist_ok=True)
        (copy / path).write_bytes(data)
    vectors = load_dataset(str(copy), split="train")
    chunks = load_dataset(str(copy), "chunks", split="train")
    assert vectors.num_rows == chunks.num_rows == manifest["totals"]["vectors"]
    assert len(vectors[0]["embedding"]) == 384


def test_a_repush_sends_no_byte_again_and_drops_files_the_run_no_longer_has(run, hub: HubServer) -> None:
    spec, plan = run
    assert cli("push", str(spec), "--repo", REPO, "--license", "other")[0] == 0
    sent = hub.state.lfs_bytes_received
    # a file an older push left there (a shard the run no longer has) goes; everything else is already there
    hub.repo(REPO).files["embeddings/shard-99999.parquet"] = b"old"
    hub.repo(REPO).lfs.add("embeddings/shard-99999.parquet")
    code, out = cli("push", str(spec), "--repo", REPO, "--license", "other")
    assert code == 0, out
    assert hub.state.lfs_bytes_received == sent  # resumed: the LFS batch said every object was there
    assert "embeddings/shard-99999.parquet" not in hub.repo(REPO).files
    check_published(hub, plan, plan.local_root(), license_id="other")


def test_push_needs_a_token_and_a_repo(run, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, _ = run
    code, out = cli("push", str(spec))
    assert code == 2 and "--repo: name the dataset repository OWNER/NAME" in out
    code, out = cli("push", str(spec), "--repo", "not a repo")
    assert code == 2 and "--repo: must be OWNER/NAME" in out
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    code, out = cli("push", str(spec), "--repo", REPO)
    assert code == 4 and "the Hub refused to create dataset acme/after-vectors (HTTP 401)" in out
    assert REPO not in hub.state.repos


def test_push_refuses_a_run_that_did_not_finish(run, hub: HubServer) -> None:
    spec, plan = run
    path = store.manifest_path(plan.local_root(), plan.name)
    manifest = json.loads(path.read_text())
    manifest["status"] = "failed"
    path.write_text(json.dumps(manifest))
    code, out = cli("push", str(spec), "--repo", REPO)
    assert code == 4 and "did not finish embedding" in out and REPO not in hub.state.repos


def test_the_card_license_is_the_source_datasets_when_the_spec_names_none(hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    from volembed_runner.publish import source_license
    from volembed_runner.spec import Spec

    hub.add_dataset("wikimedia/wikipedia", "---\nlicense: cc-by-sa-3.0\n---\n# Wikipedia\n")
    spec = Spec.model_validate({"name": "w", "volume": "v", "dataset": {"hf": "wikimedia/wikipedia"},
                                "chunking": {"size": 256}, "embedding": {"model": "BAAI/bge-small-en-v1.5"}})
    plan = make_plan(spec, tmp_path / "spec.yaml")
    assert source_license(plan, HfApi()) == ("cc-by-sa-3.0", "wikimedia/wikipedia's dataset card")


def test_output_hub_pushes_when_a_run_succeeds_and_a_failed_push_fails_the_run(run, hub: HubServer,
                                                                               monkeypatch) -> None:
    spec, plan = run
    hub_spec = spec.with_name("hub.yaml")
    hub_spec.write_text(SPEC.replace("output: {include_text: false}",
                                     f"output: {{include_text: false, hub: {{repo: {REPO}, license: cc-by-4.0}}}}"))
    code, out = cli(str(hub_spec))  # every shard is done: the pass only closes, and pushes
    assert code == 0, out
    check_published(hub, plan, plan.local_root(), license_id="cc-by-4.0")
    manifest = json.loads(store.manifest_path(plan.local_root(), plan.name).read_text())
    assert manifest["hub"]["repo"] == REPO and manifest["status"] == "succeeded"

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    code, out = cli(str(hub_spec))
    assert code == 1 and f"push to {REPO} failed" in out
    manifest = json.loads(store.manifest_path(plan.local_root(), plan.name).read_text())
    assert manifest["status"] == "failed" and "HTTP 401" in manifest["hub"]["error"]


# ── The Modal backend's path: the generated app's push function ──────────────────────────────────────────────────

MODAL_SPEC = SPEC.replace("backend: local", "backend: modal").replace(
    "output: {include_text: false}", "output: {include_text: false, hub: {repo: acme/after-vectors, secret: hf-write}}")


def test_the_apps_push_function_uploads_from_the_volume(run, hub: HubServer, monkeypatch, tmp_path: Path) -> None:
    spec, local_plan = run
    modal_spec = spec.with_name("modal-hub.yaml")
    modal_spec.write_text(MODAL_SPEC)
    plan = make_plan(load_spec(modal_spec), modal_spec)
    module = launch.import_app(render.write_app(plan, tmp_path / "app.py"))
    root = local_plan.local_root()  # the run's files, laid out as on the Volume mounted at /vol
    monkeypatch.setattr(module, "ROOT", str(root))
    monkeypatch.setattr(module, "volume", FolderVolume())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "executing locally, no access to the mounted Volume": it's a folder here
        pushed = module.push.local(REPO, True, "cc-by-sa-4.0")
    assert pushed["repo"] == REPO and module.volume.reloads == 1
    assert hub.repo(REPO).private
    check_published(hub, local_plan, root, license_id="cc-by-sa-4.0")


def test_the_push_function_deploys_on_a_cpu_image_with_the_hub_secret(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    (tmp_path / "spec.yaml").write_text(MODAL_SPEC)
    plan = make_plan(load_spec(tmp_path / "spec.yaml"), tmp_path / "spec.yaml")
    module = launch.import_app(render.write_app(plan, tmp_path / "app.py"))
    with fake_modal_server() as rec:
        module.app.deploy()
    functions = rec.functions()
    secrets = [r.deployment_name for r in rec.requests("SecretGetOrCreate")]
    assert secrets == ["hf-write"]  # compute.secrets is empty: only the push's Secret
    assert len(functions["push"].secret_ids) == len(functions["orchestrate"].secret_ids) == 1
    assert len(functions["chunk"].secret_ids) == len(functions["Embedder.*"].secret_ids) == 0
    assert functions["push"].image_id == functions["chunk"].image_id  # the CPU image, never the GPU one
    assert not functions["push"].resources.gpu_config.count
