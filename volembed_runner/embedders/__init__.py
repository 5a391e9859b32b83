"""Embedding engines: one interface, two implementations.

`Embedder` is what the embed stage calls. `embedders.local.LocalEmbedder` runs the model in-process (torch on CPU,
the `local` extra); `embedders.tei` talks to a Text Embeddings Inference server. Neither is imported here, so the
core package never pulls torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy


@runtime_checkable
class Embedder(Protocol):
    """Turns chunk texts into vectors.

    `texts` are chunk texts as stored (the engine adds `embedding.prefix` itself, exactly once); `n_tokens[i]` is
    the token count of `texts[i]` under the model's tokenizer without special tokens, used only to pack batches.
    The result is float32 with shape [len(texts), dim], row i for texts[i].
    """

    dim: int

    def embed(self, texts: list[str], n_tokens: list[int]) -> numpy.ndarray: ...
