"""Facts about the machine a run's stages execute on: usable cores and native bf16, and the precision they imply.

The plan resolves these once (so the fingerprint records what actually ran) and the engines and estimate read them
from the plan; they live here, below the plan, so nothing above has to import an engine to learn them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

from volembed_runner.errors import EmbedderError

PRECISIONS = ("auto", "fp32", "bf16")
Precision = Literal["auto", "fp32", "bf16"]
RUNTIMES = ("auto", "torch", "openvino")
Runtime = Literal["auto", "torch", "openvino"]

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or amx_bf16 in its flags); False when unknown."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(f in flags for f in _BF16_FLAGS)
    return False


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_precision(precision: str) -> Literal["fp32", "bf16"]:
    """The precision the local engine runs at: `auto` is bf16 on CPUs with native bf16, fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision  # type: ignore[return-value]


def local_device() -> Literal["cpu", "cuda"]:
    """Where the local engine runs: `cuda` when torch is installed and sees a CUDA device, else `cpu`."""
    if importlib.util.find_spec("torch") is None:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device_precision(precision: str, device: str) -> Literal["fp32", "bf16", "fp16"]:
    """The precision on `device`: on a GPU `auto` is bf16 where the GPU computes it natively, else fp16."""
    if device != "cuda" or precision != "auto":
        return resolve_precision(precision)
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_runtime(runtime: str, device: str = "cpu") -> Literal["torch", "openvino"]:
    """What runs the local engine's transformer: on a CPU `auto` is OpenVINO when it is installed, else torch; on a
    GPU always torch (OpenVINO here targets the CPU)."""
    if runtime not in RUNTIMES:
        raise EmbedderError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if device == "cuda":
        return "torch"
    if runtime == "auto":
        return "openvino" if importlib.util.find_spec("openvino") is not None else "torch"
    return runtime  # type: ignore[return-value]
