"""Modal's per-second prices: the catalog's (with their source and date), overridden by a `--prices` file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from volembed_runner import catalog
from volembed_runner.errors import SpecError, SpecIssue

# The `--prices` file's short keys (as the README documents them) → the catalog's price keys, which work too.
PRICE_KEYS = {
    "cpu": "cpu_usd_per_core_second",
    "memory": "memory_usd_per_gib_second",
    "volume": "volume_usd_per_gib_month",
}


@dataclass(frozen=True)
class Prices:
    """Modal's per-second prices; a None price is unknown and makes every cost that needs it unknown."""

    gpu: dict[str, float | None]
    cpu_core_s: float | None
    memory_gib_s: float | None
    volume_gib_month: float | None
    source: str

    def container(self, seconds: float, cores: float, gib: float, gpu: str | None = None) -> float | None:
        """Cost of `seconds` of one container: GPU + cores x $/core-s + GiB x $/GiB-s."""
        parts = [self.cpu_core_s, self.memory_gib_s] + ([self.gpu.get(gpu)] if gpu else [])
        if any(p is None for p in parts):
            return None
        per_second = float(self.gpu[gpu] or 0.0) if gpu else 0.0
        per_second += cores * float(self.cpu_core_s or 0.0) + gib * float(self.memory_gib_s or 0.0)
        return seconds * per_second


def load_prices(path: Path | None = None) -> Prices:
    """The catalog's prices, overridden by a YAML/JSON file mapping GPU name → $/s, plus optional `cpu` ($/core-s),
    `memory` ($/GiB-s) and `volume` ($/GiB-month)."""
    raw = catalog.gpu_table()
    gpu: dict[str, float | None] = {name: g.usd_per_second for name, g in catalog.gpus().items()}
    values: dict[str, float | None] = {
        "cpu_usd_per_core_second": raw.get("cpu_usd_per_core_second"),
        "memory_usd_per_gib_second": raw.get("memory_usd_per_gib_second"),
        "volume_usd_per_gib_month": raw.get("volume_usd_per_gib_month"),
    }
    source = f"catalog prices ({raw.get('price_source')}, {raw.get('price_date')})"
    if path is not None:
        overrides = _read_price_file(Path(path))
        for key, value in overrides.items():
            if PRICE_KEYS.get(key, key) in values:
                values[PRICE_KEYS.get(key, key)] = value
                continue
            found = catalog.find_gpu(key)
            if found is None:
                known = ", ".join([*catalog.gpus(), *PRICE_KEYS])
                raise SpecError([SpecIssue(str(path), key, f"unknown GPU or price key; one of: {known}")])
            gpu[found.name] = value
        source = f"prices from {path} (overriding {', '.join(overrides)}); other prices: {source}"
    return Prices(gpu, values["cpu_usd_per_core_second"], values["memory_usd_per_gib_second"],
                  values["volume_usd_per_gib_month"], source)


def _read_price_file(path: Path) -> dict[str, float | None]:
    """A price override file: a mapping (optionally under `gpus:`) of name → non-negative number or null."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError([SpecIssue(str(path), "--prices", f"cannot read price file: {exc}")]) from None
    if not isinstance(data, dict):
        raise SpecError([SpecIssue(str(path), "--prices", "must be a mapping of GPU name to $/second")])
    flat = {**{k: v for k, v in data.items() if k != "gpus"}, **(data.get("gpus") or {})}
    out: dict[str, float | None] = {}
    for key, value in flat.items():
        ok = value is None or (isinstance(value, int | float) and not isinstance(value, bool) and value >= 0)
        if not ok:
            unit = "$/GiB-month" if PRICE_KEYS.get(str(key), str(key)) == PRICE_KEYS["volume"] else "$/second"
            why = f"must be a price >= 0 in {unit} or null, got {value!r}"
            raise SpecError([SpecIssue(str(path), str(key), why)])
        out[str(key)] = None if value is None else float(value)
    return out

