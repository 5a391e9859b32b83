"""The Modal verbs of `volembed-run`: `render`, `status` and `stop`. Thin: load the spec, call, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from volembed_runner.cli import DebugOpt, JsonOpt, SetOpt, _err, _fail, _load, _out
from volembed_runner.errors import VolembedError

SpecArg = Annotated[Path, typer.Argument(help="The job spec (YAML).", dir_okay=False)]
FAILURES_SHOWN = 10


def register(app: typer.Typer) -> None:
    """Add the Modal verbs to the `volembed-run` app (once, however often it is called)."""
    present = {command.name for command in app.registered_commands}
    for name, command in (("render", render_cmd), ("status", status_cmd), ("stop", stop_cmd)):
        if name not in present:
            app.command(name)(command)


def render_cmd(
    spec: SpecArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the app here (default: stdout).")] = None,
    sets: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Write the generated Modal app for SPEC (review it, or `modal run` it yourself)."""
    from volembed_runner.backends.modal.render import render_app, write_app

    try:
        plan = _load(spec, sets, backend="modal")
        if output is None:
            sys.stdout.write(render_app(plan))
            return
        write_app(plan, output)
    except VolembedError as exc:
        _fail(exc, debug)
    _err().print(f"wrote {output}", markup=False)


def status_cmd(spec: SpecArg, sets: SetOpt = None, as_json: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Progress and failures of SPEC's run on Modal, read from the manifest on its Volume."""
    from volembed_runner.backends.modal import launch

    try:
        manifest = launch.status(_load(spec, sets, backend="modal"))
    except VolembedError as exc:
        _fail(exc, debug)
    if as_json:
        sys.stdout.write(json.dumps(manifest, indent=2) + "\n")
        return
    print_status(manifest, _out())


def print_status(manifest: dict[str, Any], console: Console) -> None:
    """A manifest as a short table: one row per stage, then the failed shards with their causes."""
    console.print(f"{manifest.get('name')}: {manifest.get('status')} (pass {manifest.get('passes')}, "
                  f"updated {manifest.get('updated_at') or manifest.get('started_at')})", markup=False)
    stages = manifest.get("stages") or {}
    table = Table(box=None, show_header=True)
    for column in ("stage", "done", "total", "skipped", "failed", "seconds"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name, entry in stages.items():
        table.add_row(name, *(str(entry.get(k) if entry.get(k) is not None else "–")
                              for k in ("done", "total", "skipped")),
                      str(len(entry.get("failed") or {})), str(entry.get("seconds") or "–"))
    if stages:
        console.print(table)
    totals = manifest.get("totals") or {}
    if totals:
        console.print("totals: " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                             for k, v in totals.items()), markup=False)
    for name, entry in stages.items():
        failed = entry.get("failed") or {}
        for shard, cause in list(failed.items())[:FAILURES_SHOWN]:
            console.print(f"failed: {name} {shard}: {cause}", markup=False)
        if len(failed) > FAILURES_SHOWN:
            console.print(f"failed: {name}: {len(failed) - FAILURES_SHOWN} more (see --json)", markup=False)


def stop_cmd(spec: SpecArg, sets: SetOpt = None, debug: DebugOpt = False) -> None:
    """Stop SPEC's running app on Modal (its containers end; finished shards stay done)."""
    from volembed_runner.backends.modal import launch

    try:
        plan = _load(spec, sets, backend="modal")
        app_id = launch.stop(plan)
    except VolembedError as exc:
        _fail(exc, debug)
    _out().print(f"stopped {plan.name} (app {app_id})", markup=False)
