"""Throughput: processed tokens/s per GPU under TEI, or of the local engine, and where each figure came from.

A stored calibration wins: `volembed-run calibrate` (locally, or the GPU probe on Modal), or the rate a finished
Modal run measured (`store_run_rate`, "measured on run NAME DATE"); else the catalog's table of measured and derived
rates (`catalog/throughput.yaml`); else the stated scaling rule, marked "scaled". Calibrations live in
`$VOLEMBED_HOME/calibration.json`, one per (backend, model, GPU or local precision, engine); a Modal one is used only
for the TEI image it was measured on (the catalog's pin for that GPU today).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from volembed_runner import catalog, store
from volembed_runner.plan import Plan, volembed_home

CALIBRATION_FILE = "calibration.json"
# The least cosine between TEI's vector and the reference library's for one chunk that a run starts without --yes,
# for a model whose catalog entry sets no `min_probe_cosine` of its own.
# (assumption) fp16 TEI against fp32 sentence-transformers agrees to > 0.999 for BERT-class models; the failures
# peers report are far below (TEI #642: Qwen3 embeddings under 0.2).
QUALITY_MIN_COSINE = 0.99


def calibration_path() -> Path:
    """Where measured throughputs are stored: `$VOLEMBED_HOME/calibration.json`."""
    return volembed_home() / CALIBRATION_FILE


def calibration_key(backend: str, model: str, device: str, engine: str) -> str:
    """One calibration per (backend, model, GPU or local precision, engine)."""
    return "|".join((backend, model, device, engine))


def local_device_key(device: str, precision: str) -> str:
    """The local engine's calibration `device`: its precision on a CPU, `cuda-<precision>` on a GPU."""
    return precision if device == "cpu" else f"{device}-{precision}"


def load_calibrations() -> dict[str, dict[str, Any]]:
    """Stored calibrations by key; an unreadable file counts as none."""
    return store.read_entries(calibration_path())


def store_calibration(entry: dict[str, Any]) -> Path:
    """Add (or replace) one calibration under its key; returns the file."""
    path = calibration_path()
    store.put_entry(path, entry["key"], entry)
    return path


@dataclass(frozen=True)
class Rate:
    """Processed tokens/s per GPU (or for the local engine) and where the figure came from."""

    tokens_per_second: float
    low: float
    high: float
    kind: str  # calibrated | table | scaled | default
    source: str
    load_seconds: float | None = None  # the local engine's measured start (imports + model load)


def current_image(gpu: str) -> str | None:
    """The TEI image a Modal run on `gpu` gets now (`registry:tag`, the catalog's pin), or None for an unknown GPU."""
    try:
        registry, tag = catalog.tei_image(gpu)
    except KeyError:
        return None
    return f"{registry}:{tag}"


def run_calibration(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The calibration a finished Modal run's manifest yields: the embed rate its orchestrator measured (the finished
    units' processed tokens ÷ their GPU-seconds, `budget.Meter`) on the (model, GPU, TEI image) it ran, with the
    run's name and end; None while it runs, or where no embed unit finished (a failed or budget-stopped run)."""
    if manifest.get("backend") != "modal" or manifest.get("status") not in ("succeeded", "failed", "stopped"):
        return None
    measured = (manifest.get("cost") or {}).get("measured") or {}
    if not measured.get("tokens_per_second") or not measured.get("units") or not measured.get("image"):
        return None
    model, gpu = str(measured["model"]), str(measured["gpu"])
    return {"key": calibration_key("modal", model, gpu, "tei"), "backend": "modal", "model": model, "device": gpu,
            "engine": "tei", "tokens_per_second": float(measured["tokens_per_second"]), "image": measured["image"],
            "run": manifest.get("name"), "date": manifest.get("finished_at"), "units": int(measured["units"]),
            "processed_tokens": measured.get("processed_tokens"), "gpu_seconds": measured.get("gpu_seconds")}


def _measured_at(entry: dict[str, Any]) -> datetime:
    try:
        when = datetime.fromisoformat(str(entry.get("date")))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def store_run_rate(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Keep a finished Modal run's measured rate (`run_calibration`) under the key the dry run reads; returns the
    stored entry, or None where there is none or a newer measurement holds the key.

    The newest measurement of a (model, GPU) wins, whether a GPU probe's or a run's: a probe after a run is made
    because something changed (the TEI pin, router flags, the chunks), and a run after a probe measured the whole
    job on its real fleet, so the later figure is the one the next run meets. A probe's quality check of the same
    image is kept with the run's rate (it is about TEI's vectors, which the run did not check).
    """
    entry = run_calibration(manifest)
    if entry is None:
        return None
    current = load_calibrations().get(entry["key"])
    if current is not None:
        if _measured_at(current) > _measured_at(entry):
            return None
        if current.get("quality") and current.get("image") == entry["image"]:
            entry["quality"] = current["quality"]
    entry["path"] = str(store_calibration(entry))
    return entry


def model_params(model: str) -> tuple[float, str | None]:
    """Millions of parameters of a catalog model, or the scaling rule's stated default (with its source)."""
    known = catalog.find_model(model)
    if known is not None:
        return float(known.params_m), None
    scaling = catalog.throughput()["scaling"]
    return float(scaling["default_params_m"]), scaling["default_params_source"]


def tei_rate(model: str, gpu: str, calibrations: dict[str, dict[str, Any]] | None = None) -> Rate:
    """Tokens/s per GPU for (model, GPU) under TEI: a calibration, the table, or the stated scaling rule."""
    calibrations = load_calibrations() if calibrations is None else calibrations
    entry = calibrations.get(calibration_key("modal", model, gpu, "tei"))
    if entry and entry.get("image") and entry["image"] != current_image(gpu):
        entry = None  # measured on another TEI build than the one a run gets now
    if entry and entry.get("run"):
        tps = float(entry["tokens_per_second"])
        return Rate(tps, tps, tps, "calibrated", f"measured on run {entry['run']} {entry.get('date')}: "
                                                 f"{tps:,.0f} tokens/s per {gpu} over {entry.get('units', '?')} "
                                                 f"embed unit(s) ({entry.get('image')}; {calibration_path()})")
    if entry:
        tps = float(entry["tokens_per_second"])
        how = f"GPU probe of {entry['image']}, " if entry.get("image") else ""
        return Rate(tps, tps, tps, "calibrated", f"calibrated on Modal {entry.get('date')}: {tps:,.0f} tokens/s "
                                                 f"over {entry.get('chunks', '?')} chunks ({how}{calibration_path()})")
    rows = catalog.throughput()["tei"]
    scaling = catalog.throughput()["scaling"]
    speed = catalog.throughput()["gpu_speed"]["factors"]
    for row in rows:
        if row["model"].lower() == model.lower() and row["gpu"] == gpu:
            return Rate(row["tokens_per_second"], row["low"], row["high"], "table",
                        f"{row['tokens_per_second']:,} tokens/s per {gpu} for {row['model']}: {row['derivation']} "
                        f"(source: {row['source']})")
    params, params_note = model_params(model)
    same_model = [r for r in rows if r["model"].lower() == model.lower()]
    same_model += [{"model": model, "gpu": e["device"], "tokens_per_second": e["tokens_per_second"],
                    "low": e["tokens_per_second"], "high": e["tokens_per_second"]}
                   for e in calibrations.values() if e.get("backend") == "modal" and e.get("model") == model]
    if same_model:
        ref = same_model[0]
        factor = speed[gpu] / speed[ref["gpu"]]
        why = f"{model} on {ref['gpu']} ({ref['tokens_per_second']:,.0f}) x GPU speed {gpu}/{ref['gpu']} {factor:.2f}"
    else:
        same_gpu = [r for r in rows if r["gpu"] == gpu] or [r for r in rows if r["gpu"] == "A10"]
        ref = min(same_gpu, key=lambda r: abs(math.log(model_params(r["model"])[0] / params)))
        ref_params = model_params(ref["model"])[0]
        model_factor = min(ref_params / params, scaling["small_model_max_speedup"])
        factor = model_factor * speed[gpu] / speed[ref["gpu"]]
        why = (f"{ref['model']} on {ref['gpu']} ({ref['tokens_per_second']:,}) x params {ref_params:g}M/"
               f"{params:g}M (capped at {scaling['small_model_max_speedup']}x) x GPU speed {gpu}/{ref['gpu']}")
    cap = float(scaling["max_scaled_tokens_per_second"])
    tps, low, high = (min(cap, float(ref[k]) * factor) for k in ("tokens_per_second", "low", "high"))
    capped = f", capped at {cap:,.0f} ({scaling['max_scaled_source']})" if tps >= cap else ""
    note = f" ({params_note})" if params_note else ""
    return Rate(tps, low, high, "scaled", f"{tps:,.0f} tokens/s per {gpu} for {model}, scaled (not measured): "
                                          f"{why}{capped}; rule {scaling['rule']}{note}")


def local_rate(plan: Plan, calibrations: dict[str, dict[str, Any]] | None = None) -> Rate:
    """Tokens/s of the in-process engine on this machine: a calibration, else the stated default scaled."""
    calibrations = load_calibrations() if calibrations is None else calibrations
    precision = plan.embed.precision  # resolved for this CPU by the plan
    batch = "" if plan.embed.batch_tokens is None else (
        f"; batches of {plan.embed.batch_tokens:,} tokens ({'measured' if plan.embed.batch_measured else 'default'})")
    entry = calibrations.get(calibration_key("local", plan.model.ref, local_device_key(plan.machine.device, precision),
                                             "local"))
    if entry:
        tps = float(entry["tokens_per_second"])
        load = entry.get("model_load_seconds")
        return Rate(tps, tps, tps, "calibrated",
                    f"local engine calibrated {entry.get('date')}: {tps:,.0f} tokens/s ({plan.machine.device}, "
                    f"{precision}, "
                    f"{entry.get('cores')} cores, {entry.get('chunks')} chunks of the job"
                    + (f", engine start {load:.1f} s" if load is not None else "") + f"; {calibration_path()}){batch}",
                    None if load is None else float(load))
    ref = catalog.throughput()["local"]
    device = plan.machine.device
    row = ref["rates"][device][precision]
    params, params_note = model_params(plan.model.ref)
    cores = plan.machine.cores
    per_core = cores / ref["cores"] if device == "cpu" else 1.0
    tps = float(row["tokens_per_second"]) * ref["params_m"] / params * per_core
    scale = f" x cores {cores}/{ref['cores']}" if device == "cpu" else ""
    note = f"; {params_note}" if params_note else ""
    return Rate(tps, tps * 0.7, tps * 1.3, "default",
                f"local engine default on {device} ({precision}): {row['tokens_per_second']:,} tokens/s for "
                f"{ref['model']} x params {ref['params_m']}M/{params:g}M{scale} = {tps:,.0f} tokens/s "
                f"({row['source']}; measured: {row['measured']}){note}; run `volembed-run calibrate` to measure it "
                f"(±30% until then){batch}")


def quality_threshold(model: str) -> tuple[float, str]:
    """The least probe cosine a run of `model` starts with (without --yes): the catalog's `min_probe_cosine` for
    the model, else QUALITY_MIN_COSINE; with where the figure comes from."""
    known = catalog.find_model(model)
    if known is not None and known.min_probe_cosine is not None:
        return float(known.min_probe_cosine), "its min_probe_cosine in volembed_runner/catalog/models.yaml"
    return QUALITY_MIN_COSINE, "the default threshold"


def quality_line(model: str, gpu: str, entry: dict[str, Any] | None) -> tuple[str, bool]:
    """How the estimate states TEI's agreement with the reference library for (model, GPU), and whether it is
    below the model's threshold (`quality_threshold`, as the catalog says it now; a run then refuses to start
    without --yes)."""
    q = (entry or {}).get("quality") or {}
    if not q.get("checked"):
        why = q.get("why") or "no GPU probe (`volembed-run calibrate SPEC`)"
        return (f"quality: not checked: TEI's vectors for {model} on {gpu} were not compared with the reference "
                f"library ({why})"), False
    threshold, _ = quality_threshold(model)
    low = q["min_cosine"] < threshold
    return (f"quality: TEI vs {q['reference']} for {model} on {gpu}: min cosine {q['min_cosine']:.4f}, mean "
            f"{q['mean_cosine']:.4f} over {q['chunks']} chunks (GPU probe {entry.get('date') if entry else '?'})"
            + (f", under {threshold} for {model}: a run refuses to start without --yes" if low else ""), low)
