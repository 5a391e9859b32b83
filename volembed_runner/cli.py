"""The `volembed-run` command line: parse, call, print. The work happens in plan, estimate, stages and backends."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from volembed_runner.errors import SpecError, SpecIssue, VolembedError

STAGES = ("download", "chunk", "embed")


class _DefaultToRun(TyperGroup):
    """`volembed-run SPEC ...` means `volembed-run run SPEC ...`; verbs stay discoverable in `--help`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultToRun,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Embed whole datasets from one YAML job spec.\n\n\b\n"
    "  volembed-run SPEC             run the job (same as `volembed-run run SPEC`)\n"
    "  volembed-run SPEC --dry-run   what it will cost and how long it will take; starts nothing",
)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE",
                 help="Override a spec key, typed as YAML: --set chunking.size=256 (repeatable)."),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(exc: VolembedError, debug: bool) -> None:
    """Print an error as one line per problem (no traceback unless --debug) and exit with its status."""
    if debug:
        raise exc
    console = _err()
    for line in str(exc).splitlines() or [type(exc).__name__]:
        console.print(f"error: {line}", markup=False)
    raise typer.Exit(exc.exit_code)


@contextmanager
def _one_line_errors(debug: bool) -> Iterator[None]:
    """Report a VolembedError raised inside as one line per problem (see `_fail`)."""
    try:
        yield
    except VolembedError as exc:
        _fail(exc, debug)


def _load(spec: Path, sets: list[str] | None, backend: str | None = None) -> Any:
    from volembed_runner.loading import load_spec
    from volembed_runner.plan import make_plan

    loaded = load_spec(spec, sets)
    return make_plan(loaded, spec, backend=backend)


def _print_plan(plan: Any, console: Console) -> None:
    table = Table(title=f"plan: {plan.name} ({plan.backend})", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    d, c, e, k = plan.data, plan.chunk, plan.embed, plan.compute
    source = f"hf {d.hf} [{d.config or 'default'}/{d.split}]" if d.kind == "hf" else f"{len(d.files)} file(s)"
    table.add_row("dataset", f"{source}" + (f", limit {d.limit}" if d.limit else ""))
    table.add_row("chunks", f"{c.size} tokens, overlap {c.overlap}, tokenizer {c.tokenizer_id}")
    table.add_row("embedding", f"{e.model} via {e.engine}" + (f", prefix {e.prefix!r}" if e.prefix else ""))
    if plan.backend == "modal":
        table.add_row("compute", f"{k.gpu} × ≤{k.concurrency_limit} containers, "
                      f"{k.allow_concurrent_inputs} shards in flight each")
    table.add_row("fingerprints", f"data {d.fingerprint}  chunks {c.fingerprint}  embeddings {e.fingerprint}")
    root = plan.local_root() if plan.backend == "local" else f"modal volume {plan.volume}"
    table.add_row("outputs", str(root))
    console.print(table)
    for warning in plan.warnings:
        console.print(f"warning: {warning}", markup=False)


@app.command("run")
def run_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).", dir_okay=False)],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and estimate; start nothing.")] = False,
    until: Annotated[
        str | None, typer.Option(metavar="STAGE", help="Stop after this stage: download, chunk or embed.")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation; override max_cost.")] = False,
    backend: Annotated[str | None, typer.Option(metavar="local|modal", help="Override the spec's backend.")] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Modal: return once the run is submitted.")] = False,
    prices: Annotated[
        Path | None, typer.Option(metavar="FILE", help="A YAML/JSON price table overriding the catalog's.")
    ] = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run the job in SPEC (or, with --dry-run, say what it would cost and take)."""
    with _one_line_errors(debug):
        if until is not None and until not in STAGES:
            raise SpecError([_option_issue("--until", f"must be one of {', '.join(STAGES)}, got {until!r}")])
        if backend is not None and backend not in ("local", "modal"):
            raise SpecError([_option_issue("--backend", f"must be local or modal, got {backend!r}")])
        plan = _load(spec, sets, backend)
        from volembed_runner import run as runner

        code = runner.run(
            plan, dry_run=dry_run, until=until, yes=yes, detach=detach, prices=prices, as_json=as_json,
            out=_out(), err=_err(),
        )
    raise typer.Exit(code)


def _option_issue(option: str, message: str) -> SpecIssue:
    return SpecIssue("", option, message)


@app.command("validate")
def validate_cmd(
    specs: Annotated[list[Path], typer.Argument(help="Spec files to check.")],
    sets: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Check specs: every error in every file, with file:line:col and the field."""
    from volembed_runner.loading import load_spec

    failed = 0
    for path in specs:
        try:
            load_spec(path, sets)
        except SpecError as exc:
            failed += 1
            if debug:
                raise
            for issue in exc.issues:
                _err().print(f"error: {issue}", markup=False)
            continue
        _out().print(f"ok: {path}", markup=False)
    raise typer.Exit(2 if failed else 0)


@app.command("schema")
def schema_cmd() -> None:
    """Print the JSON Schema of the spec (editors use it for completion and checks)."""
    from volembed_runner.schema import spec_schema

    sys.stdout.write(json.dumps(spec_schema(), indent=2) + "\n")


@app.command("plan")
def plan_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).", dir_okay=False)],
    sets: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Print the resolved plan as JSON: every setting, fingerprint and output folder after defaults."""
    with _one_line_errors(debug):
        plan = _load(spec, sets)
    sys.stdout.write(json.dumps(plan.to_dict(), indent=2) + "\n")


@app.command("render")
def render_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).", dir_okay=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the app here (default: stdout).")] = None,
    sets: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Write the generated Modal app for SPEC (review it, or `modal run` it yourself)."""
    from volembed_runner.backends.modal.render import render_app, write_app

    with _one_line_errors(debug):
        plan = _load(spec, sets, backend="modal")
        if output is None:
            sys.stdout.write(render_app(plan))
            return
        write_app(plan, output)
    _err().print(f"wrote {output}", markup=False)


@app.command("status")
def status_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).", dir_okay=False)],
    sets: SetOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Progress and failures of SPEC's run, read from its manifest (on the Modal Volume, or the local folder)."""
    from volembed_runner import store
    from volembed_runner.backends.modal import launch
    from volembed_runner.errors import BackendError

    with _one_line_errors(debug):
        plan = _load(spec, sets)
        if plan.backend == "modal":
            manifest = launch.status(plan)
        else:
            manifest = store.read_json(store.manifest_path(plan.local_root(), plan.name))
            if manifest is None:
                raise BackendError(f"{plan.name} has not run here yet (no manifest under {plan.local_root()})")
    if as_json:
        sys.stdout.write(json.dumps(manifest, indent=2) + "\n")
        return
    _print_status(manifest, _out())


FAILURES_SHOWN = 10


def _print_status(manifest: dict[str, Any], console: Console) -> None:
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


@app.command("stop")
def stop_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).", dir_okay=False)],
    sets: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Stop SPEC's running app on Modal (its containers end; finished shards stay done)."""
    from volembed_runner.backends.modal import launch

    with _one_line_errors(debug):
        plan = _load(spec, sets, backend="modal")
        app_id = launch.stop(plan)
    _out().print(f"stopped {plan.name} (app {app_id})", markup=False)


@app.command("calibrate")
def calibrate_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).", dir_okay=False)],
    chunks: Annotated[
        int, typer.Option("--chunks", metavar="N", help="Chunks of the job to embed for the measurement.")
    ] = 256,
    backend: Annotated[str | None, typer.Option(metavar="local|modal", help="Override the spec's backend.")] = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Embed a small sample of the job's chunks and store the measured tokens/s for later --dry-run estimates."""
    from volembed_runner.estimate import calibrate

    with _one_line_errors(debug):
        plan = _load(spec, sets, backend)
        entry = calibrate(plan, sample_chunks=chunks)
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


def main() -> None:
    """Console-script entry point."""
    app()
