"""Embedding engines: one interface, two implementations.

`Embedder` is what an in-process engine offers (`embedders.local.LocalEmbedder`: torch on CPU, the `local` extra);
`AsyncEmbedder` is what the embed stage awaits, which the TEI client (`embedders.tei`) is and `InProcess` makes of
an in-process engine. Neither engine is imported here, so the core package never pulls torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy


@runtime_checkable
class Embedder(Protocol):
    """Turns chunk texts into vectors, in this process.

    `texts` are chunk texts as stored (the engine adds `embedding.prefix` itself, exactly once); `n_tokens[i]` is
    the token count of `texts[i]` under the model's tokenizer without special tokens, used only to pack batches.
    The result is float32 with shape [len(texts), dim], row i for texts[i]. `truncations(n_tokens)` says how many
    texts of those token counts the engine cuts to the model's input limit (when it may cut at all).
    """

    dim: int

    def embed(self, texts: list[str], n_tokens: list[int]) -> numpy.ndarray: ...

    def truncations(self, n_tokens: list[int]) -> int: ...


class AsyncEmbedder(Protocol):
    """An embedder the embed stage awaits (the TEI client; an in-process engine through `InProcess`)."""

    dim: int | None

    async def embed(self, texts: list[str], n_tokens: list[int]) -> numpy.ndarray: ...

    def truncations(self, n_tokens: list[int]) -> int: ...


class InProcess:
    """An in-process engine as an `AsyncEmbedder`: its work runs on the caller's thread, one shard at a time."""

    def __init__(self, engine: Embedder) -> None:
        self.engine = engine

    @property
    def dim(self) -> int:
        """The engine's vector width."""
        return self.engine.dim

    def truncations(self, n_tokens: list[int]) -> int:
        """How many of these texts the engine cuts to the model's limit."""
        return self.engine.truncations(n_tokens)

    async def embed(self, texts: list[str], n_tokens: list[int]) -> numpy.ndarray:
        """The engine's vectors for `texts` (it blocks the event loop: the local backend runs one shard at a time)."""
        return self.engine.embed(texts, n_tokens)
