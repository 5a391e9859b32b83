"""The in-process embedding engine for `backend: local`: a sentence-transformers model run by OpenVINO or torch.

It stands in for TEI and behaves like it: the spec's prefix is prepended once, the model's own Normalize module is
skipped and vectors are L2-normalized only when `normalize` is set, `dimensions` keeps the leading (Matryoshka)
components. Texts are sorted by token count and packed into batches by a padded-token budget (the plan's: measured
on this machine by `volembed-run calibrate`, else the catalog's default; `batching`); rows come back in input order.
bf16 (autocast: matmuls in bf16, the rest in fp32) is ~1.7-2x faster than fp32 on CPUs with native
bf16 at cosine >= 0.9999, so `precision: auto` picks it exactly there.

Runtime: on a CPU the model's transformer runs under OpenVINO (`openvino`, in the `local` extra) when it is
installed: the same weights, exported once from the resolved folder (offline) into `cache_dir` (the backends pass
`plan.openvino_cache()`: $VOLEMBED_CACHE/openvino, else $VOLEMBED_HOME/openvino) keyed by the weights' fingerprint
and OpenVINO's version, compiled with bf16 or f32 inference precision; pooling and any later modules stay
in torch. It was ~1.3-3x torch bf16 autocast on a 2-vCPU Zen 4 at the same cosine (`benchmarks/bench_local_engine.py`).
`runtime="torch"` (or no openvino) keeps the torch path.

torch and sentence-transformers are imported when an engine is built, never when this module is imported.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from volembed_runner.batching import default_budget, texts_for
from volembed_runner.embedders.vectors import check_vectors
from volembed_runner.errors import EmbedderError, ModelError, TextsFailedError
from volembed_runner.machine import (
    Precision,
    Runtime,
    local_device,
    resolve_device_precision,
    resolve_runtime,
    usable_cores,
)
from volembed_runner.models import resolve_model_dir, weights_fingerprint

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

def pack_batches(lengths: list[int], batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, with max(length) * count <= batch_tokens and count <=
    max_batch_size; a text longer than the budget runs alone. Every index appears exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    padded = 0
    for i in order:
        if current and ((len(current) + 1) * padded > batch_tokens or len(current) >= max_batch_size):
            batches.append(current)
            current = []
        if not current:
            padded = max(lengths[i], 1)
        current.append(i)
    if current:
        batches.append(current)
    return batches


class LocalEmbedder:
    """Embeds texts in this process on the CPU with a sentence-transformers model found on this machine."""

    def __init__(
        self,
        model: str,
        revision: str | None = None,
        prefix: str = "",
        normalize: bool = True,
        precision: Precision = "auto",
        dimensions: int | None = None,
        batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        threads: int | None = None,
        download: bool = True,
        truncate: bool = True,
        runtime: Runtime = "auto",
        cache_dir: Path | None = None,
        device: str | None = None,
    ) -> None:
        self.device = device or local_device()
        on_gpu = self.device == "cuda"
        batch_tokens = batch_tokens or default_budget(self.device).tokens
        max_batch_size = max_batch_size or texts_for(batch_tokens, self.device)
        if batch_tokens < 1 or max_batch_size < 1:
            raise EmbedderError(f"batch_tokens ({batch_tokens}) and max_batch_size ({max_batch_size}) must be >= 1")
        self.model = model
        self.revision = revision
        self.prefix = prefix
        self.normalize = normalize
        self.precision: Literal["fp32", "bf16", "fp16"] = resolve_device_precision(precision, self.device)
        self.truncate = truncate  # off: a text over the model's limit is an error (as TEI's 422), not cut
        self.batch_tokens = batch_tokens
        self.max_batch_size = max_batch_size
        self.path = resolve_model_dir(model, revision, download=download)
        # Counters over the engine's lifetime; the embed stage reads them before and after a shard.
        self.truncated = 0
        self.texts_embedded = 0
        self.real_tokens = 0  # tokens the model saw, specials included
        self.padded_tokens = 0  # tokens it computed: batch rows x longest row
        self.runtime = resolve_runtime(runtime, self.device)

        import torch

        self.threads = threads or usable_cores()
        torch.set_num_threads(self.threads)
        self._st = _load(model, self.path, self.device)
        if on_gpu and self.precision != "fp32":
            self._st.to(torch.bfloat16 if self.precision == "bf16" else torch.float16)
        self._modules = _forward_modules(self._st)
        self._preprocess = getattr(self._st, "preprocess", None) or self._st.tokenize  # sentence-transformers 6 / 5
        tokenizer = self._st.tokenizer
        self.max_seq_length: int = self._st.max_seq_length or getattr(tokenizer, "model_max_length", None) or 512
        self._special_tokens = _special_tokens(tokenizer)
        self._ov: Any = _openvino_transformer(self._st, self.path, self.precision, self.threads, cache_dir) \
            if self.runtime == "openvino" else None
        self._prefix_tokens = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
        self.dimensions: int | None = None
        self.model_dim = self._probe_dim()
        if dimensions is not None and not 1 <= dimensions <= self.model_dim:
            raise ModelError(f"embedding.dimensions={dimensions}: model {model} gives {self.model_dim}-dim vectors")
        self.dimensions = dimensions
        self.dim: int = dimensions or self.model_dim
        self.real_tokens = self.padded_tokens = 0  # the probe does not count

    def embed(self, texts: list[str], n_tokens: list[int]) -> np.ndarray:
        """float32 vectors [len(texts), dim] in input order; `n_tokens` (tokens per text, no specials) packs them."""
        if len(n_tokens) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(n_tokens)} token counts")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        overhead = self._special_tokens + self._prefix_tokens
        if not self.truncate:
            over = [i for i, n in enumerate(n_tokens) if n + overhead > self.max_seq_length]
            if over:
                raise TextsFailedError(
                    f"local engine ({self.model}): text {over[0]} is {n_tokens[over[0]] + overhead} tokens with its "
                    f"special and prefix tokens, over the model's {self.max_seq_length}", tuple(over))
        lengths = [min(n + overhead, self.max_seq_length) for n in n_tokens]
        for batch in pack_batches(lengths, self.batch_tokens, self.max_batch_size):
            out[batch] = self._embed_batch([self.prefix + texts[i] for i in batch])
        out = check_vectors(out, rows=len(texts), dim=self.dim, normalize=self.normalize,
                            source=f"local engine ({self.model})", where=f"{len(texts)} texts")
        self.texts_embedded += len(texts)
        return out

    def truncations(self, n_tokens: list[int]) -> int:
        """How many texts of these token counts the engine cuts to its limit (with special and prefix tokens)."""
        overhead = self._special_tokens + self._prefix_tokens
        return sum(1 for n in n_tokens if n + overhead > self.max_seq_length)

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        try:
            autocast = self.device == "cpu" and self.precision == "bf16"
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                features = self._preprocess(texts)
                if self.device != "cpu":
                    features = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in features.items()}
                mask = features["attention_mask"]
                self.truncated += self._count_truncated(texts, mask)
                self.real_tokens += int(mask.sum())
                self.padded_tokens += mask.numel()
                modules = self._modules
                if self._ov is not None:
                    names = [i.get_any_name() for i in self._ov.inputs]
                    hidden = self._ov({n: features[n].numpy() for n in names})[0]
                    features["token_embeddings"] = torch.from_numpy(hidden)
                    modules = modules[1:]
                for module in modules:
                    features = module(features)
                vectors = features["sentence_embedding"].float()
            if self.dimensions is not None:
                vectors = vectors[:, : self.dimensions]
            if self.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            return vectors.cpu().numpy()
        except (RuntimeError, MemoryError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            message = f"local engine failed on a batch of {len(texts)} texts ({self.model}): {reason}"
            raise EmbedderError(message) from exc

    def _count_truncated(self, texts: list[str], attention_mask: Any) -> int:
        """Texts cut at max_seq_length; only rows that fill it are re-tokenized to check."""
        full = (attention_mask.sum(dim=1) >= self.max_seq_length).nonzero().flatten().tolist()
        if not full:
            return 0
        ids = self._st.tokenizer([texts[i] for i in full], truncation=False, verbose=False)["input_ids"]
        return sum(len(row) > self.max_seq_length for row in ids)

    def _probe_dim(self) -> int:
        """The width of the model's output, from one empty text (some models do not declare it)."""
        return int(self._embed_batch([""]).shape[1])

    def __repr__(self) -> str:
        return (f"LocalEmbedder({self.model!r}, device={self.device!r}, runtime={self.runtime!r}, "
                f"precision={self.precision!r}, "
                f"dim={self.dim}, threads={self.threads})")


def _load(model: str, path: Path, device: str = "cpu") -> SentenceTransformer:
    """The model from its folder, with no network and no progress bars."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        st = SentenceTransformer(str(path), device=device, local_files_only=True)
    except Exception as exc:  # transformers/safetensors raise many types for a broken or unsupported folder
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"model {model} in {path} cannot be loaded by sentence-transformers: {reason}") from exc
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    st.eval()
    return st


def _forward_modules(st: SentenceTransformer) -> list[Any]:
    """The model's modules minus Normalize: normalization is the engine's `normalize` setting, as in TEI."""
    try:
        from sentence_transformers.base.modules import Normalize
    except ImportError:  # sentence-transformers 5
        from sentence_transformers.models import Normalize
    return [m for m in st if not isinstance(m, Normalize)]


def _special_tokens(tokenizer: Any) -> int:
    try:
        return int(tokenizer.num_special_tokens_to_add(pair=False))
    except (AttributeError, TypeError):
        return 2


_EXPORTS: dict[str, Any] = {}  # this process's exports by key: engines built again reuse them


def _openvino_transformer(st: SentenceTransformer, path: Path, precision: str, threads: int,
                          cache_dir: Path | None) -> Any:
    """The model's transformer compiled by OpenVINO for this CPU: token embeddings from the tokenizer's features.

    The export (a few seconds) is cached under `cache_dir` by the weights' fingerprint and OpenVINO's version, so a
    cache shared by homes or processes never serves other weights; the export is the f32 graph and the precision a
    compile setting, so one export serves fp32 and bf16 alike."""
    import openvino as ov
    import torch

    core = ov.Core()
    key = f"{weights_fingerprint(path)}-ov{ov.__version__.split('-')[0]}"
    cached = None if cache_dir is None else Path(cache_dir) / key / "model.xml"
    if cached is not None and cached.is_file():
        graph = core.read_model(str(cached))
    else:
        graph = _EXPORTS.get(key) or _EXPORTS.setdefault(key, _export(st, ov, torch))
        if cached is not None:
            _save_export(ov, graph, cached.parent)
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
              "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    try:
        return core.compile_model(graph, "CPU", config)
    except RuntimeError as exc:
        raise ModelError(f"OpenVINO cannot compile {path} for this CPU: {str(exc).splitlines()[0]}") from exc


def _save_export(ov: Any, graph: Any, folder: Path) -> None:
    """Write an export to `folder` whole: saved into a folder of this process's own, then renamed into place; when
    another process put its export there first, that one stays."""
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    ov.save_model(graph, str(tmp / "model.xml"), compress_to_fp16=False)
    try:
        tmp.replace(folder)
    except OSError:  # the folder exists: another process's export of the same key
        shutil.rmtree(tmp, ignore_errors=True)


def _export(st: SentenceTransformer, ov: Any, torch: Any) -> Any:
    """Trace the Transformer module's model into an OpenVINO graph with dynamic batch and sequence axes."""
    auto_model = st[0].auto_model.eval()
    features = st.tokenizer(["an example", "a second example text"], return_tensors="pt", padding=True)
    example = {k: features[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in features}

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = auto_model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the trace's config warnings (e.g. `loss_type=None`) are not the user's concern
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's and transformers' warnings speak of their internals
            return ov.convert_model(TokenEmbeddings().eval(), example_input=example)
    except Exception as exc:  # the converter raises many types for a model it cannot trace
        raise ModelError(f"OpenVINO cannot export this model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); use runtime torch") from exc
    finally:
        hf_logging.set_verbosity(verbosity)

