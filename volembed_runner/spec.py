"""The YAML job spec as pydantic v2 models: field types, defaults and the cross-field rules a job must satisfy.

Loading (files, `${VAR}`, `extends:`, `--set`, line numbers) lives in `loading.py`; this module only says what a
valid spec is. Cross-field errors carry the offending field in their context so they are reported at its line.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, model_validator
from pydantic_core import PydanticCustomError

from volembed_runner import catalog
from volembed_runner.late import DEFAULT_LATE_DIM, INDEX_MEMORY_SHARE, index_bytes_per_token, max_index_shard_tokens

SPEC_VERSION = 1
DEFAULT_CHUNK_SIZE = 512  # tokens per chunk when the spec sets none and the model takes that many
# Columns the shards, chunks and vectors have of their own: a kept source column may not take one of these names.
RESERVED_COLUMNS = ("id", "text", "doc_id", "chunk_index", "char_start", "char_end", "n_tokens", "embedding")


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError(
            "bool_not_count",
            "must be a positive integer, not {value} (Modal's old `allow_concurrent_inputs=True` meant 1, "
            "which starved GPUs)",
            {"value": str(value).lower()},
        )
    return value


def _limit(value: Any) -> Any:
    ok = not isinstance(value, bool) and (
        (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value <= 1)
    )
    if value is not None and not ok:
        raise PydanticCustomError(
            "limit", "must be a row count (integer >= 1) or a fraction in (0, 1], got '{value}'", {"value": value}
        )
    return value


def _overlap(value: Any) -> Any:
    ok = not isinstance(value, bool) and (
        (isinstance(value, int) and value >= 0) or (isinstance(value, float) and 0 <= value < 0.5)
    )
    if not ok:
        raise PydanticCustomError(
            "overlap",
            "must be tokens (integer >= 0) or a fraction of size in [0, 0.5), got '{value}'",
            {"value": value},
        )
    return value


# Constraints sit before the validators, so pydantic writes them into the JSON Schema as `minimum` (after a
# BeforeValidator it writes its own `ge`, which no editor reads).
Count = Annotated[int, Field(ge=1), BeforeValidator(_no_bool)]
NonNegative = Annotated[int, Field(ge=0), BeforeValidator(_no_bool)]
# A row limit: a count, or a fraction in (0, 1]; an overlap: tokens, or a fraction of the chunk size in [0, 0.5).
Limit = Annotated[Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0, le=1)], BeforeValidator(_limit)]
Overlap = Annotated[Annotated[int, Field(ge=0)] | Annotated[float, Field(ge=0, lt=0.5)], BeforeValidator(_overlap)]


def _one_or_many(value: Any) -> Any:
    """One path or glob, or a list of them, as a list."""
    return [value] if isinstance(value, str) else value


def _safe_name(value: str) -> str:
    if "/" in value or "\\" in value or value in (".", "..") or value.startswith((".", "~")):
        raise PydanticCustomError("unsafe_name", "must be a plain name, not a path ('{value}')", {"value": value})
    return value


def _cross(field: str, message: str, **ctx: Any) -> PydanticCustomError:
    """An error about `field` of the model being validated, reported at that field's line."""
    return PydanticCustomError("cross_field", message, {"field": field, **ctx})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_default=True)


class Dataset(_Section):
    """Where the documents come from and which columns matter."""

    hf: str | None = Field(None, description="Hub dataset id, e.g. wikimedia/wikipedia (exactly one of hf / files)")
    config: str | None = Field(None, description="Hub dataset config (subset), e.g. 20231101.en")
    split: str = Field("train", description="Hub dataset split")
    revision: str | None = Field(None, description="Hub dataset revision (branch, tag or commit) to pin")
    files: Annotated[list[str], BeforeValidator(_one_or_many, json_schema_input_type=str | list[str])] | None = Field(
        None,
        description="Local path/glob(s): parquet, jsonl(.gz), json, csv, or a folder of .txt/.md/.pdf; relative to "
        "the spec file; `package:<module>/<path>` names a file inside an installed Python package",
    )
    text_column: str | None = Field(None, description="Column to embed (default `text`)")
    text_template: str | None = Field(None, description='Embed several columns, e.g. "{title}\\n\\n{text}"')
    id_column: str | None = Field(None, description="Column holding a document id; default a stable row id")
    keep_columns: list[str] = Field(default_factory=list, description="Columns copied to every chunk and vector")
    limit: Limit | None = Field(
        None, description="First N rows (int >= 1) or a fraction of rows (float in (0, 1]), in shard order"
    )
    num_rows: Count | None = Field(None, description="Size hint for the dry run: number of rows")
    num_bytes: Count | None = Field(None, description="Size hint for the dry run: UTF-8 bytes of the text column")
    shard_rows: Count = Field(50_000, description="Most documents per shard, the unit of download and chunk work "
                              "and of their resume; embed units are cut from chunk shards to fit the fleet")
    duplicate_ids: Literal["error", "suffix"] = Field(
        "error", description="Ids that occur more than once: fail naming them (error), or rename later copies "
        "<id>#2, <id>#3 (suffix)")

    @model_validator(mode="after")
    def _check(self) -> Dataset:
        if (self.hf is None) == (self.files is None):
            field = "files" if self.files is not None else "hf"
            raise _cross(field, "exactly one of dataset.hf and dataset.files must be set")
        if self.files is not None and not self.files:
            raise _cross("files", "must list at least one path or glob")
        reserved = [name for name in RESERVED_COLUMNS if name in self.keep_columns]
        if reserved:
            raise _cross("keep_columns", "cannot keep {names}: the output files have columns of that name ({all})",
                         names=" and ".join(reserved), all=", ".join(RESERVED_COLUMNS))
        if self.text_column is not None and self.text_template is not None:
            raise _cross("text_template", "set text_column or text_template, not both")
        if self.text_template is not None:
            try:
                fields = template_fields(self.text_template)
            except ValueError as exc:
                raise _cross("text_template", "is not a valid template: {reason}", reason=str(exc)) from None
            if not fields:
                raise _cross("text_template", "names no column; use placeholders like {example}", example="{title}")
        elif self.text_column is None:
            self.text_column = "text"
        return self

    @property
    def source_columns(self) -> list[str]:
        """Columns the download stage reads from the source."""
        text = template_fields(self.text_template) if self.text_template else [self.text_column or "text"]
        extra = [self.id_column] if self.id_column else []
        return list(dict.fromkeys([*text, *extra, *self.keep_columns]))


def template_fields(template: str) -> list[str]:
    """Column names a `text_template` refers to, in order; raises ValueError on a malformed template."""
    import string

    names = (name for _, name, _, _ in string.Formatter().parse(template) if name)
    return list(dict.fromkeys(re.split(r"[.\[]", name, maxsplit=1)[0] for name in names))


class Chunking(_Section):
    """How documents are cut into token windows."""

    size: Count | None = Field(
        None, description="Max tokens per chunk, in the embedding model's tokenizer; unset: 512, or fewer where the "
        "model takes fewer (its input limit minus its special tokens and the prefix's)"
    )
    overlap: Overlap = Field(
        50, description="Tokens shared by neighbouring chunks: int >= 0, or a fraction of size in [0, 0.5)"
    )
    workers: Count = Field(100, description="Parallel chunk containers on Modal; processes locally (capped by cores)")

    @property
    def overlap_tokens(self) -> int:
        """The overlap in tokens (a fraction is taken of `size`, rounded down)."""
        return int(self.overlap * self.chunk_size) if isinstance(self.overlap, float) else self.overlap

    @property
    def chunk_size(self) -> int:
        """`size`, once the spec has resolved an unset one against its model (`resolve_size`)."""
        return DEFAULT_CHUNK_SIZE if self.size is None else self.size

    @model_validator(mode="after")
    def _check(self) -> Chunking:
        if self.size is not None and self.overlap_tokens >= self.size:
            raise _cross("overlap", "must be smaller than chunking.size ({size})", size=self.size)
        return self

    def resolve_size(self, embedding: Embedding) -> None:
        """Give an unset `size` its default: 512, or the model's budget where that is smaller (bge-base takes 510),
        so a spec that names only its model always fits it."""
        if self.size is not None:
            return
        budget = model_budget(embedding)
        self.size = DEFAULT_CHUNK_SIZE if budget is None else max(1, min(DEFAULT_CHUNK_SIZE, budget))
        if self.overlap_tokens >= self.size:
            raise _cross("chunking.overlap", "must be smaller than chunking.size ({size}, the default for {model})",
                         size=self.size, model=embedding.model)


class Embedding(_Section):
    """The embedding model and how its inputs and outputs are shaped."""

    kind: Literal["dense", "late_interaction"] = Field(
        "dense", description="dense: one vector per chunk; late_interaction: one vector per token (ColBERT, run by "
        "PyLate), with a MaxSim index and search")
    model: str = Field(..., description="Hub model id, or a local folder with the model's files")
    revision: str | None = Field(None, description="Model commit to pin for reproducible runs")
    prefix: str | None = Field(None, description='Text put before every chunk, e.g. "search_document: " for nomic; '
                               "default: the catalog's prefix for known models, else none")
    query_prefix: str | None = Field(None, description='Text `volembed-run search` puts before a query, e.g. '
                                     '"search_query: " for nomic; default: the catalog\'s for known models, else none')
    normalize: bool = Field(True, description="L2-normalize the vectors")
    dimensions: Count | None = Field(None, description="Matryoshka: keep the first N dimensions, then normalize")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Local engine only (TEI runs float16): auto = bf16 where the CPU has native bf16"
    )
    endpoint: Annotated[str, Field(json_schema_extra={"pattern": URL_PATTERN}),
                        AfterValidator(lambda v: _http_url(v))] | None = Field(
        None, description="Embed through your own TEI server at this URL instead of the backend's engine"
    )
    truncate: bool = Field(
        False, description="Let the engine cut a chunk over the model's input limit (counted) instead of failing; "
        "chunks are cut to fit, so this only matters for models the catalog does not know")


URL_PATTERN = r"^https?://[^\s/]+"


def _http_url(value: str) -> str:
    if not re.match(URL_PATTERN, value):
        raise PydanticCustomError("url", "must be an http:// or https:// URL, got '{value}'", {"value": value})
    return value.rstrip("/")


def _any_case(name: str) -> str:
    """`name` as a regex that matches it in any letter case (JSON Schema patterns take no flags)."""
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else f"\\{c}" if c in r".^$*+?()[]{}|\/" else c
                   for c in name)


@cache
def gpu_pattern() -> str:
    """The GPU names and aliases `catalog.find_gpu` accepts (any case, outer spaces), as a JSON Schema pattern."""
    names = [n for gpu in catalog.gpus().values() for n in (gpu.name, *gpu.aliases)]
    return r"^\s*(" + "|".join(_any_case(n) for n in names) + r")\s*$"


def _gpu_name(value: str) -> str:
    gpu = catalog.find_gpu(value)
    if gpu is None:
        known = ", ".join(catalog.gpus())
        raise PydanticCustomError("gpu", "unknown GPU '{value}'; one of: {known}", {"value": value, "known": known})
    return gpu.name


class Compute(_Section):
    """Where the GPU stage runs and how far it fans out (Modal backend)."""

    gpu: Annotated[str, Field(json_schema_extra=lambda schema: schema.update(pattern=gpu_pattern())),
                   AfterValidator(lambda v: _gpu_name(v))] = Field(
        "A10", description="One GPU per container; old names (A10G) map to Modal's current (A10)"
    )
    concurrency_limit: Count = Field(10, description="Max GPU containers (Modal max_containers)")
    allow_concurrent_inputs: Count = Field(
        4, description="Embed units in flight per GPU container (Modal @modal.concurrent max_inputs)"
    )
    secrets: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,63}$")]] = Field(
        default_factory=list, description="Modal Secret names, e.g. [huggingface] for HF_TOKEN")
    max_cost: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Refuse to start a run whose estimated cost (USD) exceeds this, or is unknown"
    )
    max_batch_tokens: Count | None = Field(None, description="TEI --max-batch-tokens (default: per GPU, catalog)")
    timeout: Annotated[int, Field(ge=60, le=86_400)] = Field(
        3600, description="Seconds one input (a source file, a shard, an embed unit) may take in one container "
        "attempt (Modal timeout); embed units are cut to a quarter of it"
    )
    retries: NonNegative = Field(3, description="Modal retries per input, of transient failures only (container "
                                 "loss, preemption, timeouts, TEI 5xx, Volume I/O)")



class Hub(_Section):
    """Publish the run's chunks and vectors as a Hub dataset when a run succeeds (also `volembed-run push`)."""

    repo: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")] = Field(
        ..., description="The dataset repository, OWNER/NAME (created when missing)")
    private: bool = Field(False, description="Create the repository private")
    secret: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,63}$")] | None = Field(
        None, description="Modal backend: the Modal Secret holding HF_TOKEN for the upload (locally: HF_TOKEN or "
        "`hf auth login`)")
    license: str | None = Field(
        None, description="The dataset card's license id (default: the source dataset's, read from its card)")


class LateOutput(_Section):
    """The token index of a late-interaction run (`embedding.kind: late_interaction`)."""

    index_shard_tokens: int | None = Field(
        None, ge=1, description="The most token vectors one index shard holds (one shard is in RAM at a time); "
        "default: what half the index container's memory holds at dim x 4 + M x 2 x 4 + overhead bytes per token")


class Output(_Section):
    """What the embedding files carry besides the vectors, and where the run is published."""

    include_text: bool = Field(False, description="Copy chunk text into the embedding files")
    index: Literal["lancedb"] | None = Field(
        None, description="Index stage after embed: the run's vectors as a LanceDB table (with an ANN index once it "
        "holds 100,000 rows), which `volembed-run search` uses; needs the `index` extra")
    hub: Hub | None = Field(None, description="Push the chunk and embedding files to the Hub as a finish step")
    late: LateOutput | None = Field(None, description="Late interaction: the token index's shard size")


def local_only_error(model: str, backend: str) -> str | None:
    """Why `model` cannot run on `backend` (a catalog model made or kept on this machine, on Modal), or None."""
    known = catalog.find_model(model)
    if known is None or not known.local_only or backend != "modal":
        return None
    return (f"{known.id} is built on this machine for the offline demo (local only), so it cannot run with "
            "backend: modal; use a Hub ColBERT model such as colbert-ir/colbertv2.0, or backend: local")


def index_shard_error(tokens: int, known: catalog.Model | None) -> str | None:
    """Why an index shard of `tokens` token vectors is refused: it cannot hold one chunk's vectors, or it would
    not fit the index container's memory; None when it fits."""
    if known is not None and tokens < known.max_input_tokens:
        return (f"{tokens} cannot hold one chunk's token vectors: {known.id} gives up to {known.max_input_tokens} "
                f"per chunk; set at least {known.max_input_tokens}")
    dim = known.dim if known is not None else DEFAULT_LATE_DIM
    memory = int(catalog.containers()["embed"]["memory_mib"])
    most = max_index_shard_tokens(memory, dim)
    if tokens > most:
        need = tokens * index_bytes_per_token(dim) / 2**30
        return (f"{tokens:,} token vectors need {need:,.1f} GiB of RAM ({index_bytes_per_token(dim)} bytes each), "
                f"more than {INDEX_MEMORY_SHARE:.0%} of the index container's {memory / 1024:g} GiB allows "
                f"(at most {most:,})")
    return None


class Spec(BaseModel):
    """One embedding job: dataset → chunks → vectors."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, title="volembed-runner pipeline spec")
    _variables: dict[str, str] = PrivateAttr(default_factory=dict)  # `${VAR}` values used: never recorded

    version: Literal[1] = Field(SPEC_VERSION, description="Spec format version")
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$"), AfterValidator(_safe_name)] = Field(
        ..., description="Lowercase letters, digits and '-': names the Modal app and the run folder"
    )
    backend: Literal["local", "modal"] = Field("local", description="modal: a generated Modal app; local: this machine")
    volume: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,63}$"), AfterValidator(_safe_name)] = Field(
        ..., description="Modal Volume name; on local, a folder under $VOLEMBED_HOME/volumes/"
    )
    dataset: Dataset
    chunking: Chunking = Field(default_factory=Chunking)
    embedding: Embedding
    compute: Compute = Field(default_factory=Compute)
    output: Output = Field(default_factory=Output)

    @property
    def prefix(self) -> str:
        """The prefix actually applied: the spec's, else the catalog default for a known model, else none."""
        return applied_prefix(self.embedding)

    @property
    def query_prefix(self) -> str:
        """The prefix `search` puts before a query: the spec's, else the catalog's for a known model, else none."""
        if self.embedding.query_prefix is not None:
            return self.embedding.query_prefix
        known = catalog.find_model(self.embedding.model)
        return known.query_prefix if known else ""

    @model_validator(mode="after")
    def _kind_fits(self) -> Spec:
        """A late-interaction job names a ColBERT model, sets nothing that only dense engines read, and runs where
        PyLate runs (the local engine, or Modal's GPU image; not a TEI endpoint, which serves no ColBERT model)."""
        emb, known = self.embedding, catalog.find_model(self.embedding.model)
        kind = known.kind if known else None
        if kind is not None and kind != emb.kind:
            hint = ("set embedding.kind: late_interaction" if kind == "late_interaction"
                    else "late_interaction needs a ColBERT model, e.g. colbert-ir/colbertv2.0")
            raise _cross("embedding.kind", "{model} is a {kind} model, not {wanted}; {hint}", model=known.id,
                         kind=kind.replace("_", "-"), wanted=emb.kind.replace("_", "-"), hint=hint)
        if emb.kind != "late_interaction":
            if self.output.late is not None:
                raise _cross("output.late", "applies to embedding.kind: late_interaction only (the token index); "
                             "remove it")
            return self
        for field, value, default in (("dimensions", emb.dimensions, None), ("normalize", emb.normalize, True),
                                      ("endpoint", emb.endpoint, None), ("prefix", emb.prefix, None),
                                      ("truncate", emb.truncate, False), ("query_prefix", emb.query_prefix, None)):
            if value != default:
                raise _cross(f"embedding.{field}", "does not apply to late_interaction: PyLate adds the model's "
                             "markers, normalizes every token vector, cuts at the document length, and no TEI serves "
                             "ColBERT; remove it")
        if self.compute.max_batch_tokens is not None:
            raise _cross("compute.max_batch_tokens", "is a TEI setting; late_interaction runs PyLate, not TEI")
        if self.output.index is not None:
            raise _cross("output.index", "does not apply to late_interaction, which builds its own token index "
                         "(Voyager) after embed; remove it")
        error = local_only_error(emb.model, self.backend)
        if error is not None:
            raise _cross("embedding.model", error)
        shard_tokens = self.output.late.index_shard_tokens if self.output.late else None
        if shard_tokens is not None:
            error = index_shard_error(shard_tokens, known)
            if error is not None:
                raise _cross("output.late.index_shard_tokens", error)
        return self

    @model_validator(mode="after")
    def _fits_model(self) -> Spec:
        self.chunking.resolve_size(self.embedding)
        error = model_fit_error(self.chunking, self.embedding)
        if error is not None:
            raise error
        return self

    @model_validator(mode="after")
    def _truncatable(self) -> Spec:
        known = catalog.find_model(self.embedding.model)
        wanted = self.embedding.dimensions
        if known is None or wanted is None:
            return self
        if known.matryoshka_min_dim is None:
            raise _cross("embedding.dimensions", "{model} was not trained for Matryoshka truncation (its model card, "
                         "{card}, names no smaller sizes), so its first {wanted} dimensions are not an embedding; "
                         "leave dimensions null for its {dim}", model=known.id, card=known.card or "none",
                         wanted=wanted, dim=known.dim)
        if not known.matryoshka_min_dim <= wanted <= known.dim:
            raise _cross("embedding.dimensions", "{model} was trained for {low} to {dim} dimensions ({source}), "
                         "got {wanted}", model=known.id, low=known.matryoshka_min_dim, dim=known.dim,
                         source=known.matryoshka_source or known.card, wanted=wanted)
        return self


class ModelFit(BaseModel):
    """The chunk-size-vs-model rule on its own: pydantic skips Spec's check when any other field is invalid, and
    `validate` reports every error at once, this one included."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)

    chunking: Chunking = Field(default_factory=Chunking)
    embedding: Embedding

    @model_validator(mode="after")
    def _fits_model(self) -> ModelFit:
        self.chunking.resolve_size(self.embedding)
        error = model_fit_error(self.chunking, self.embedding)
        if error is not None:
            raise error
        return self


def applied_prefix(embedding: Embedding) -> str:
    """The prefix applied to every chunk: the spec's, else the catalog default for a known model, else none."""
    if embedding.prefix is not None:
        return embedding.prefix
    known = catalog.find_model(embedding.model)
    return known.default_prefix if known else ""


def model_budget(embedding: Embedding) -> int | None:
    """The most chunk tokens a known model takes: its input limit minus its special tokens and the prefix's."""
    known = catalog.find_model(embedding.model)
    if known is None:
        return None
    return known.max_input_tokens - known.special_tokens - prefix_tokens(applied_prefix(embedding), embedding.model)


def model_fit_error(chunking: Chunking, embedding: Embedding) -> PydanticCustomError | None:
    """Why `chunking.size` (with the prefix and special tokens) does not fit a known model's input, or None."""
    known = catalog.find_model(embedding.model)
    budget = model_budget(embedding)
    if known is None or budget is None or chunking.chunk_size <= budget:
        return None
    n_prefix = known.max_input_tokens - known.special_tokens - budget
    return _cross(
        "chunking.size",
        "{size} tokens do not fit {model} ({limit} max input tokens, minus {special} special tokens and "
        "{prefix} prefix tokens = {budget})",
        size=chunking.chunk_size,
        model=known.id,
        limit=known.max_input_tokens,
        special=known.special_tokens,
        prefix=n_prefix,
        budget=budget,
    )


@cache
def prefix_tokens(prefix: str, model: str) -> int:
    """Tokens the prefix adds, counted offline with the model's tokenizer or a same-family stand-in (see
    `models.offline_tokenizer_file`), else a safe overestimate."""
    if not prefix:
        return 0
    from volembed_runner.chunking import load_tokenizer
    from volembed_runner.models import offline_tokenizer_file

    found = offline_tokenizer_file(model)
    if found is None:
        return len(prefix.encode("utf-8")) // 2 + 1
    return len(load_tokenizer(found[0]).encode(prefix, add_special_tokens=False).ids)
