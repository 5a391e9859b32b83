"""How long `load_spec` takes on the example pipelines and on hostile specs at the loader's bounds (prints figures,
asserts nothing).

Baseline: the slowest example pipeline (pipelines/*.yaml), loaded warm in this process. Each hostile spec — the
issue's 742-byte alias bomb (9 levels of 9), 5,000 nested `[`, a spec just under MAX_SPEC_BYTES of keys, one over
it, and a 14-deep `extends` chain — is timed the same way and printed as a ratio to the baseline. Goal: the
examples well under a second each; every hostile spec refused (or loaded) in about a second at most.

    python benchmarks/bench_validate.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from volembed_runner.errors import SpecError
from volembed_runner.loading import MAX_SPEC_BYTES, load_spec

REPO = Path(__file__).resolve().parent.parent


def timed(path: Path) -> tuple[float, str]:
    """Best of three loads of `path`: seconds, and `ok` or the first error line."""
    best, outcome = float("inf"), "ok"
    for _ in range(3):
        started = time.perf_counter()
        try:
            load_spec(path)
            outcome = "ok"
        except SpecError as exc:
            outcome = str(exc.issues[0])[:90]
        best = min(best, time.perf_counter() - started)
    return best, outcome


def _under_bound() -> str:
    """A mapping of distinct keys as long as the size bound allows."""
    lines, size, i = [], 0, 0
    while size + 16 < MAX_SPEC_BYTES:
        lines.append(f"k{i}: {i}\n")
        size += len(lines[-1])
        i += 1
    return "".join(lines)


def hostile(folder: Path) -> dict[str, Path]:
    """The hostile specs, written into `folder`."""
    bomb = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    bomb += [f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    specs = {
        "alias bomb (742 B)": "\n".join(bomb) + "\n",
        "5,000 nested [": "[" * 5000,
        "keys just under the size bound": _under_bound(),
        "16 MB of unknown keys": "".join(f"k{i}: 1\n" for i in range(1_500_000)),
    }
    paths = {}
    for i, (name, text) in enumerate(specs.items()):
        paths[name] = folder / f"hostile-{i}.yaml"
        paths[name].write_text(text)
    previous = REPO / "pipelines" / "local-demo.yaml"
    for i in range(14):
        link = folder / f"chain-{i}.yaml"
        link.write_text(f"extends: {previous}\n")
        previous = link
    paths["14-deep extends chain"] = previous
    return paths


def main() -> None:
    examples = sorted((REPO / "pipelines").glob("*.yaml"))
    for path in examples:
        load_spec(path)  # warm: imports, catalog, tokenizer caches
    rows = [(f"example {p.name}", *timed(p)) for p in examples]
    baseline = max(seconds for _, seconds, _ in rows)
    with tempfile.TemporaryDirectory() as tmp:
        rows += [(name, *timed(path)) for name, path in hostile(Path(tmp)).items()]
    print(f"baseline: slowest example pipeline, {baseline * 1000:.1f} ms")
    for name, seconds, outcome in rows:
        print(f"{name:34} {seconds * 1000:9.1f} ms  {seconds / baseline:8.1f}x  {outcome}")


if __name__ == "__main__":
    main()
