"""`volembed-run calibrate SPEC`: measure tokens/s on the spec's backend and store it for later dry runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from volembed_runner.cli import DebugOpt, JsonOpt, SetOpt
from volembed_runner.errors import VolembedError


def register(app: typer.Typer) -> None:
    """Add the `calibrate` command to the CLI (once, however often it is called)."""
    if any(c.name == "calibrate" for c in app.registered_commands):
        return

    @app.command("calibrate")
    def calibrate_cmd(
        spec: Annotated[Path, typer.Argument(help="The job spec (YAML).", dir_okay=False)],
        chunks: Annotated[int, typer.Option("--chunks", help="Chunks of the job to embed for the measurement.")] = 256,
        backend: Annotated[str | None, typer.Option(help="Override the spec's backend: local or modal.")] = None,
        sets: SetOpt = None,
        as_json: JsonOpt = False,
        debug: DebugOpt = False,
    ) -> None:
        """Embed a small sample of the job's chunks and store the measured tokens/s for later --dry-run estimates."""
        from volembed_runner.cli import _fail, _load, _out
        from volembed_runner.estimate import calibrate

        try:
            plan = _load(spec, sets, backend)
            entry = calibrate(plan, sample_chunks=chunks)
        except VolembedError as exc:
            _fail(exc, debug)
        if as_json:
            sys.stdout.write(json.dumps(entry) + "\n")
            return
        load = entry.get("model_load_seconds")
        _out().print(
            f"calibrated {entry['model']} ({entry['backend']}, {entry['device']}, {entry['engine']} engine): "
            f"{entry['tokens_per_second']:,.0f} tokens/s over {entry['chunks']} chunks "
            f"({entry['processed_tokens']:,} tokens in {entry['seconds']:.2f} s"
            + (f"; model load {load:.1f} s" if load is not None else "")
            + f"); stored in {entry['path']}",
            markup=False,
        )
