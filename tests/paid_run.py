"""A paid Modal spec for the tests of what happens before a run spends money (the `launched` fixture fakes launch)."""

from __future__ import annotations

SPEC = """\
version: 1
name: paid
backend: modal
volume: v
dataset:
  hf: org/data
  num_rows: 1000000
  num_bytes: 2000000000
chunking: {size: 256, overlap: 32}
embedding: {model: BAAI/bge-base-en-v1.5}
compute: {gpu: A10G, concurrency_limit: 10}
"""
