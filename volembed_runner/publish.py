"""Publish a run on the Hugging Face Hub: its current chunk and embedding files, with a generated dataset card.

The card's YAML header has `configs` pointing at the files (`embeddings`, the default, and `chunks`), so
`load_dataset("OWNER/NAME")` loads the vectors; its body names the source dataset and license, the model and
revision, the chunking settings, the counts and the spec itself. The upload is `HfApi.upload_folder`, which in
huggingface_hub 2.x is the resumable large-folder upload (several commits, unchanged files skipped on a rerun;
`upload_large_folder` of 1.x was folded into it). It runs where the files are: on this machine for a local run, in
a CPU container that mounts the Volume for a Modal run, so nothing passes through the laptop.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from volembed_runner import store
from volembed_runner.errors import BackendError, first_line
from volembed_runner.plan import HubSettings, Plan
from volembed_runner.results import Entry, LocalVolume, Outputs, current_outputs, finished_files

CONFIGS = (("embeddings", "embeddings"), ("chunks", "chunks"))  # (config name, folder in the repository)
UNKNOWN_LICENSE = "other"


@dataclass(frozen=True)
class Pushed:
    """A finished push: the repository, the commit it made, and what it uploaded."""

    repo: str
    url: str
    commit: str | None
    files: int
    bytes: int
    license: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the manifest's `hub` entry, `--json`)."""
        return asdict(self)


def _hub_error(action: str, exc: Exception) -> BackendError:
    """One line: the Hub's answer (with its HTTP status), or why it could not be reached."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status:
        return BackendError(f"the Hub refused to {action} (HTTP {status}): {first_line(exc)}")
    return BackendError(f"could not {action} on the Hub ({constants_endpoint()}): {first_line(exc)}")


def constants_endpoint() -> str:
    """The Hub huggingface_hub talks to (HF_ENDPOINT, default https://huggingface.co)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def source_license(plan: Plan, api: Any) -> tuple[str, str]:
    """The card's license and where it came from: the spec's, the source dataset card's, or unknown."""
    if plan.hub is not None and plan.hub.license:
        return plan.hub.license, "output.hub.license"
    if plan.data.kind == "hf" and plan.data.hf:
        try:
            card = api.dataset_info(plan.data.hf, revision=plan.data.revision).card_data
        except Exception as exc:  # any failure to read it: "unknown", said on the card
            return UNKNOWN_LICENSE, f"unknown: {plan.data.hf}'s card could not be read ({first_line(exc)})"
        found = getattr(card, "license", None) if card is not None else None
        if isinstance(found, list):
            found = found[0] if found else None
        if found:
            return str(found), f"{plan.data.hf}'s dataset card"
        return UNKNOWN_LICENSE, f"unknown: {plan.data.hf}'s dataset card names none"
    return UNKNOWN_LICENSE, "unknown for local files: set output.hub.license (or push --license)"


def _source(plan: Plan) -> str:
    d = plan.data
    if d.kind == "hf":
        where = f"[`{d.hf}`](https://huggingface.co/datasets/{d.hf})"
        return where + f", config `{d.config or 'default'}`, split `{d.split}`, revision `{d.revision or 'main'}`"
    names = ", ".join(f"`{PurePosixPath(f).name}`" for f in d.files[:5]) + (" …" if len(d.files) > 5 else "")
    return f"{len(d.files)} local file(s): {names}"


def dataset_card(plan: Plan, manifest: dict[str, Any], license_id: str, license_from: str) -> str:
    """The README.md of the published dataset (a `huggingface_hub.DatasetCard`)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    totals = manifest.get("totals") or {}
    configs = [{"config_name": name, **({"default": True} if name == "embeddings" else {}),
                "data_files": [{"split": "train", "path": f"{folder}/*.parquet"}]} for name, folder in CONFIGS]
    data = DatasetCardData(
        license=license_id,
        pretty_name=f"{plan.name}: chunks and {plan.model.ref} embeddings",
        tags=["embeddings", "volembed-runner"],
        source_datasets=[plan.data.hf] if plan.data.kind == "hf" and plan.data.hf else None,
        configs=configs,
    )
    e, c, m = plan.embed, plan.chunk, plan.model
    dims = "/".join(str(d) for d in totals.get("dims") or []) or str(e.dim or "?")
    keep = ", ".join(f"`{k}`" for k in e.keep_columns)
    columns = "`doc_id`, `chunk_index`, `char_start`, `char_end`, `n_tokens`" + (f", {keep}" if keep else "")
    rows = [
        ("source dataset", _source(plan)),
        ("source license", f"`{license_id}` ({license_from})"),
        ("model", f"[`{m.ref}`](https://huggingface.co/{m.ref})" if not Path(m.ref).is_absolute() else f"`{m.ref}`"),
        ("model revision", f"`{m.revision}`" if m.revision else "not pinned (the Hub's main when the run started)"),
        ("prefix", f"`{e.prefix!r}`" if e.prefix else "none"),
        ("vectors", f"float32 × {dims}, " + ("L2-normalized" if e.normalize else "not normalized")
         + (f", Matryoshka-truncated to {e.dimensions}" if e.dimensions else "")),
        ("chunking", f"windows of at most {c.size} tokens of the model's tokenizer, overlap {c.overlap}, cut on "
                     "word boundaries; chunk text is a slice of the document (`char_start`:`char_end`)"),
        ("counts", f"{int(totals.get('documents', 0)):,} documents ({int(totals.get('empty_documents', 0)):,} "
                   f"empty), {int(totals.get('chunks', 0)):,} chunks, {int(totals.get('tokens', 0)):,} tokens, "
                   f"{int(totals.get('vectors', 0)):,} vectors"),
        ("fingerprints", ", ".join(f"{k} `{v}`" for k, v in (manifest.get("fingerprints") or {}).items())),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    spec_yaml = yaml.safe_dump(plan.spec, sort_keys=False, allow_unicode=True).strip()
    repo = plan.hub.repo if plan.hub else "OWNER/NAME"
    body = f"""# {plan.name}

Chunks and embeddings of {_source(plan)}, made by [volembed-runner](https://pypi.org/project/volembed-runner/) from
the spec below.

| | |
|---|---|
{table}

## Load it

```python
from datasets import load_dataset

vectors = load_dataset("{repo}", split="train")            # config `embeddings` (the default)
chunks = load_dataset("{repo}", "chunks", split="train")   # the chunks with their text
```

- `embeddings/*.parquet`: {columns}{", `text`" if e.include_text else ""}, `embedding`
  (`fixed_size_list<float32>[{dims}]`).
- `chunks/*.parquet`: {columns}, `text`.

Rows of `embeddings` and `chunks` match on (`doc_id`, `chunk_index`).

## The spec

```yaml
{spec_yaml}
```
"""
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _stage(staging: Path, root: Path, folder: str, entries: list[Entry]) -> int:
    """Link a stage's finished files into the upload folder (no copy); returns their bytes."""
    target = staging / folder
    target.mkdir(parents=True, exist_ok=True)
    for e in entries:
        (target / PurePosixPath(e.path).name).symlink_to(root / e.path)
    return sum(e.size for e in entries)


def check_publishable(plan: Plan, root: Path, outputs: Outputs) -> dict[str, Any]:
    """The run's manifest, when its last pass succeeded and embedded every chunk shard; else why not."""
    manifest = store.read_json(store.manifest_path(root, plan.name))
    if manifest is None or not outputs.recorded:
        raise BackendError(f"{plan.name} has not run on this volume yet: nothing to push")
    totals = manifest.get("totals") or {}
    if manifest.get("status") != "succeeded" or "embed" not in (manifest.get("stages") or {}):
        raise BackendError(f"{plan.name}'s last pass did not finish embedding (status {manifest.get('status')}); "
                           "push publishes a complete run only: rerun the spec first")
    if totals.get("embed_shards_done") != totals.get("chunk_shards_done"):
        raise BackendError(f"{plan.name}: {totals.get('embed_shards_done')} of {totals.get('chunk_shards_done')} "
                           "chunk shards are embedded; rerun the spec first")
    return manifest


def push_run(root: Path, plan: Plan, hub: HubSettings, *, token: str | None = None) -> Pushed:
    """Upload the run's current chunk and embedding files and its card to `hub.repo` (created when missing)."""
    from huggingface_hub import HfApi, get_token

    plan = replace(plan, hub=hub)
    outputs = current_outputs(plan, root)
    manifest = check_publishable(plan, root, outputs)
    token = token or get_token()
    if not token:
        raise BackendError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (on Modal, name a Secret "
                           "holding HF_TOKEN in output.hub.secret)")
    api = HfApi(token=token)
    files = LocalVolume(root)
    license_id, license_from = source_license(plan, api)
    with tempfile.TemporaryDirectory(prefix="volembed-push-") as tmp:
        staging = Path(tmp)
        size = count = 0
        for _, folder in CONFIGS:
            entries = finished_files(files, outputs.folders[folder])
            size += _stage(staging, root, folder, entries)
            count += len(entries)
        card = dataset_card(plan, manifest, license_id, license_from)
        (staging / "README.md").write_text(card, encoding="utf-8")
        try:
            url = api.create_repo(hub.repo, repo_type="dataset", private=hub.private, exist_ok=True)
        except Exception as exc:  # huggingface_hub raises HTTP and validation errors alike
            raise _hub_error(f"create dataset {hub.repo}", exc) from exc
        try:
            info = api.upload_folder(
                repo_id=hub.repo, repo_type="dataset", folder_path=staging,
                commit_message=f"volembed-runner: {plan.name} (embeddings {outputs.fingerprints['embeddings']})",
                # a repush replaces the files of an older push that this one no longer has
                delete_patterns=[f"{folder}/*.parquet" for _, folder in CONFIGS],
            )
        except Exception as exc:
            raise _hub_error(f"upload to {hub.repo}", exc) from exc
    return Pushed(hub.repo, str(url), getattr(info, "oid", None), count + 1, size + len(card.encode()), license_id)
