"""The `volembed-run` command line: parse, call, print. The work happens in plan, estimate, stages and backends."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from typer.core import TyperGroup

from volembed_runner.errors import SpecError, SpecIssue, VolembedError
from volembed_runner.ui.console import (
    ask,
    err_console,
    out_console,
    print_calibration,
    print_plan,
    print_status,
    print_summary,
)
from volembed_runner.ui.results import print_next_steps

if TYPE_CHECKING:
    from volembed_runner.plan import HubSettings, Plan
    from volembed_runner.results import VolumeFiles

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


def _print_version(value: bool) -> None:
    """`--version`: the installed package's version, then exit."""
    if value:
        from importlib.metadata import version

        sys.stdout.write(f"volembed-run {version('volembed-runner')}\n")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the version and exit.")] = False,
) -> None:
    pass


def _fail(exc: VolembedError, debug: bool) -> None:
    """Print an error as one line per problem (no traceback unless --debug) and exit with its status."""
    if debug:
        raise exc
    from volembed_runner.redact import scrub

    console = err_console()
    for line in scrub(str(exc)).splitlines() or [type(exc).__name__]:
        console.print(f"error: {line}", markup=False)
    raise typer.Exit(exc.exit_code)


@contextmanager
def _one_line_errors(debug: bool) -> Iterator[None]:
    """Report a VolembedError raised inside as one line per problem (see `_fail`)."""
    try:
        yield
    except VolembedError as exc:
        _fail(exc, debug)


def _load(spec: Path, sets: list[str] | None, backend: str | None = None) -> Plan:
    """The spec file, loaded, validated and resolved into a plan."""
    from volembed_runner.loading import load_spec
    from volembed_runner.plan import make_plan

    loaded = load_spec(spec, sets)
    return make_plan(loaded, spec, backend=backend)


@app.command("run")
def run_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
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
        if detach and plan.backend != "modal":
            raise SpecError([_option_issue("--detach", "only for backend: modal; this spec runs locally, in this "
                                                       "process (Ctrl-C stops it, finished shards stay done)")])
        if dry_run:
            _dry_run(plan, prices, as_json)
        elif plan.backend == "modal":
            _run_modal(plan, until=until, yes=yes, detach=detach, prices=prices, as_json=as_json, debug=debug)
        else:
            _run_local(plan, until=until, as_json=as_json)


def _dry_run(plan: Plan, prices: Path | None, as_json: bool) -> None:
    from volembed_runner.estimate import estimate
    from volembed_runner.ui.estimate import render

    if plan.backend == "modal":
        from volembed_runner.backends.modal.render import validate

        validate(plan)  # what the run would refuse, the dry run refuses too
    est = estimate(plan, prices=prices)
    out = out_console()
    if as_json:
        fingerprints = {"data": plan.data.fingerprint, "chunks": plan.chunk.fingerprint,
                        "embeddings": plan.embed.fingerprint}
        summary = {"name": plan.name, "backend": plan.backend, "fingerprints": fingerprints}
        out.print_json(json.dumps({"plan": summary, **est.to_dict()}))
        return
    print_plan(plan, out)
    render(est, out)


def _on_terminal() -> bool:
    """True when standard input is a terminal, so a question can be answered there."""
    return sys.stdin.isatty()


def _run_modal(plan: Plan, *, until: str | None, yes: bool, detach: bool, prices: Path | None,
               as_json: bool, debug: bool = False) -> None:
    from volembed_runner.backends.modal.launch import require_credentials
    from volembed_runner.backends.modal.render import validate
    from volembed_runner.estimate import estimate
    from volembed_runner.run import check_quality, check_spend, run_modal
    from volembed_runner.ui.estimate import summary_line

    validate(plan)  # a spec that cannot run well on Modal is refused before its estimate is shown
    require_credentials()  # before the question: a "y" must not be answered by "no Modal credentials"
    check_quality(plan, yes=yes)
    err = err_console()
    est = estimate(plan, prices=prices)
    err.print(f"estimate: {plan.name} on Modal: {summary_line(est)} (details: --dry-run)", markup=False)
    for reason in est.unknown:
        err.print(f"unknown: {reason}", markup=False)
    ask_first = _on_terminal() and not yes
    check_spend(plan, est, yes=yes,
                confirm=(lambda _: ask(err, f"Start {plan.name} on Modal? [y/N] ")) if ask_first else None)
    from volembed_runner.ui.progress import RunProgress

    # On a terminal, bars drawn from the progress record polled from the Volume; piped (or --debug, --json), Modal's
    # own output: image builds, the containers' logs and the orchestrator's plain progress lines.
    bars = err.is_terminal and not (debug or as_json or detach)
    if bars:
        err.print(f"starting {plan.name} on Modal (a first run builds its images: minutes); progress shows once the "
                  "orchestrator runs (--debug streams Modal's own output instead)", markup=False)
    with RunProgress(err, quiet=not bars) as progress:
        launched = run_modal(plan, until=until, detach=detach, prices=prices,
                             on_upload=lambda n, where: err.print(f"uploading {n} file(s) to Modal volume {where}",
                                                                  markup=False),
                             on_progress=progress.show if bars else None)
    if launched.detached:
        err.print(f"submitted {plan.name} (app {launched.app_id}, call {launched.call_id}); follow it with "
                  "`volembed-run status SPEC`, end it with `volembed-run stop SPEC`", markup=False)
    elif as_json:
        out_console().print_json(json.dumps(launched.summary))
    else:
        err.print(f"{plan.name}: done ({', '.join(launched.summary.get('stages') or [])})", markup=False)
        print_next_steps(plan, err)


def _run_local(plan: Plan, *, until: str | None, as_json: bool) -> None:
    from volembed_runner.run import failures, run_local
    from volembed_runner.ui.progress import RunProgress

    with RunProgress(err_console(), quiet=as_json) as progress:
        summary = run_local(plan, until=until, on_event=progress)
    if not as_json:  # where, whatever the current folder (`volembed_home`): status and files find it from anywhere
        err_console().print(f"{plan.name}: outputs under {plan.local_root()}", markup=False)
    if as_json:
        out_console().print_json(json.dumps(summary.to_dict()))
    else:
        print_summary(summary, out_console())
        print_next_steps(plan, out_console())
    error = failures(summary)
    if error is not None:
        raise error


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
                err_console().print(f"error: {issue}", markup=False)
            continue
        out_console().print(f"ok: {path}", markup=False)
    raise typer.Exit(2 if failed else 0)


@app.command("schema")
def schema_cmd() -> None:
    """Print the JSON Schema of the spec (editors use it for completion and checks)."""
    from volembed_runner.schema import spec_schema

    sys.stdout.write(json.dumps(spec_schema(), indent=2) + "\n")


@app.command("plan")
def plan_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    sets: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Print the resolved plan as JSON: every setting, fingerprint and output folder after defaults."""
    from volembed_runner.results import planned_outputs

    with _one_line_errors(debug):
        plan = _load(spec, sets)
    from volembed_runner.redact import public_record

    shown = public_record({**plan.to_dict(), "outputs": planned_outputs(plan)})
    sys.stdout.write(json.dumps(shown, indent=2) + "\n")


@app.command("render")
def render_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
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
    err_console().print(f"wrote {output}", markup=False)


@app.command("status")
def status_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    backend: Annotated[str | None, typer.Option(metavar="local|modal", help="Override the spec's backend.")] = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Progress and failures of SPEC's run, read from its manifest (on the Modal Volume, or the local folder); a run
    whose writer stopped without finishing shows as interrupted."""
    from volembed_runner.backends.modal import launch
    from volembed_runner.errors import BackendError
    from volembed_runner.lease import FileLeaseStore, current
    from volembed_runner.run import manifest_of
    from volembed_runner.status import live_status

    with _one_line_errors(debug):
        if backend is not None and backend not in ("local", "modal"):
            raise SpecError([_option_issue("--backend", f"must be local or modal, got {backend!r}")])
        plan = _load(spec, sets, backend)
        if plan.backend == "modal":
            from volembed_runner.backends.modal.volume_files import lease_store

            manifest = launch.status(plan)
            launch.keep_measured_rate(plan, manifest)  # a finished run's rate, for later dry runs
            try:
                record, known = current(lease_store(plan)), True
            except Exception:  # the lease Dict unreadable: show the manifest as written, not a guess
                record, known = None, False
            manifest = live_status(manifest, record, lease_known=known)
        else:
            from volembed_runner.store import lease_dir

            manifest = manifest_of(plan)
            if manifest is None:
                raise BackendError(f"{plan.name} has not run here yet (no manifest under {plan.local_root()})")
            root = plan.local_root()
            manifest = live_status(manifest, current(FileLeaseStore(lease_dir(root, plan.name))), root=root)
    if as_json:
        sys.stdout.write(json.dumps(manifest, indent=2) + "\n")
        return
    print_status(manifest, out_console())


@app.command("stop")
def stop_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    sets: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Stop SPEC's running app on Modal (its containers end; finished shards stay done)."""
    from volembed_runner.backends.modal import launch

    with _one_line_errors(debug):
        plan = _load(spec, sets)
        if plan.backend != "modal":
            raise SpecError([SpecIssue(plan.spec_path, "backend", "local: stop ends Modal runs; a local run stops "
                                       "with Ctrl-C in its terminal (finished shards stay done)")])
        app_id = launch.stop(plan)
    out_console().print(f"stopped {plan.name} (app {app_id})", markup=False)


@app.command("calibrate")
def calibrate_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    chunks: Annotated[
        int, typer.Option("--chunks", metavar="N", help="Chunks of the job to embed for the measurement.")
    ] = 256,
    backend: Annotated[str | None, typer.Option(metavar="local|modal", help="Override the spec's backend.")] = None,
    compare: Annotated[
        list[str] | None, typer.Option("--compare", metavar="GPU", help="Modal: probe this GPU type too (repeatable).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Modal: do not ask before the probe; override max_cost.")]
    = False,
    prices: Annotated[
        Path | None, typer.Option(metavar="FILE", help="A YAML/JSON price table overriding the catalog's.")
    ] = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Embed a small sample of the job's chunks and store the measured tokens/s for later --dry-run estimates (on
    Modal: a GPU probe of the job's own TEI image, priced and confirmed before it starts; locally it also times a
    few batch budgets and keeps the fastest for later runs)."""
    from volembed_runner.estimate.calibrate import calibrate

    with _one_line_errors(debug):
        plan = _load(spec, sets, backend)
        if plan.backend != "modal":
            entries = [calibrate(plan, sample_chunks=chunks)]
        else:
            entries = _probe(spec, sets, plan, chunks=chunks, compare=compare or [], yes=yes, prices=prices)
    if as_json:
        sys.stdout.write(json.dumps(entries[0] if len(entries) == 1 else entries) + "\n")
        return
    for entry in entries:
        print_calibration(entry, out_console())


def _probe(spec: Path, sets: list[str] | None, plan: Plan, *, chunks: int, compare: list[str], yes: bool,
           prices: Path | None) -> list[dict[str, Any]]:
    """The GPU probe on the spec's GPU and each `--compare` GPU, priced and confirmed as a run is."""
    from volembed_runner.backends.modal import launch
    from volembed_runner.errors import BackendError
    from volembed_runner.estimate.calibrate import ProbeSpend, probe_gpus, sample_of
    from volembed_runner.estimate.prices import load_prices
    from volembed_runner.run import check_spend
    from volembed_runner.ui.console import print_probe_cost

    if plan.late is not None:  # the probe times the TEI router; PyLate's Embedder has none
        raise BackendError("calibrate: the GPU probe measures TEI, and a late-interaction job runs PyLate; use "
                           "--backend local to measure the engine on this machine")
    launch.require_credentials()  # before the sample is cut and priced
    plans = [plan]
    for gpu in compare:
        other = _load(spec, [*(sets or []), f"compute.gpu={gpu}"], "modal")
        if other.compute.gpu not in [p.compute.gpu for p in plans]:  # each GPU type once, aliases included
            plans.append(other)
    err = err_console()

    def approve(spend: ProbeSpend) -> None:
        print_probe_cost(spend, err)
        check_spend(plan, spend, yes=yes, confirm=(lambda s: ask(err, "Start the GPU probe? [y/N] "))
                    if _on_terminal() else None)

    return probe_gpus(plans, sample_of(plan, chunks), launch.probe, prices=load_prices(prices), approve=approve)


# ── After the run: files, gc, fetch, search, report, push ─────────────────────────────────────────────────────────────
OUTPUT_STAGES = ("data", "chunks", "embeddings")


def _volume(plan: Plan) -> tuple[VolumeFiles, str]:
    """The run's volume as the after-run verbs read it, and how its paths are printed (the local folder; `/vol`,
    where the app's containers mount a Modal Volume)."""
    if plan.backend == "modal":
        from volembed_runner.backends.modal.volume_files import open_volume
        from volembed_runner.plan import MODAL_ROOT

        return open_volume(plan), MODAL_ROOT
    from volembed_runner.results import LocalVolume

    return LocalVolume(plan.local_root()), str(plan.local_root())


@app.command("files")
def files_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    stage: Annotated[str | None, typer.Option(metavar="STAGE", help="Print only this stage's glob: data, chunks "
                                              "or embeddings.")] = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The run's current output folders as globs, pasteable into DuckDB, pyarrow or `datasets`."""
    from volembed_runner.results import finished_files, read_outputs
    from volembed_runner.ui.results import print_files

    with _one_line_errors(debug):
        if stage is not None and stage not in OUTPUT_STAGES:
            raise SpecError([_option_issue("--stage", f"must be one of {', '.join(OUTPUT_STAGES)}, got {stage!r}")])
        plan = _load(spec, sets)
        files, root = _volume(plan)
        outputs = read_outputs(plan, files, root)
        counts = {}
        for name in (stage,) if stage else OUTPUT_STAGES:
            done = finished_files(files, outputs.folders[name])
            counts[name] = (len(done), sum(e.size for e in done))
    if as_json:
        sys.stdout.write(json.dumps({**outputs.to_dict(), "files": {k: {"count": c, "bytes": b}
                                                                     for k, (c, b) in counts.items()}},
                                    indent=2) + "\n")
        return
    print_files(outputs, counts, stage, plan.backend, out_console())


@app.command("gc")
def gc_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete the stale folders (default: only list them).")]
    = False,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List the run's stale fingerprint folders with their sizes; delete them with --yes (never the current ones)."""
    from volembed_runner.lease import FileLeaseStore, Holder, held
    from volembed_runner.results import remove_stale, stale_folders
    from volembed_runner.ui.results import print_gc

    with _one_line_errors(debug):
        plan = _load(spec, sets)
        files, _ = _volume(plan)
        found = stale_folders(plan, files)
        if yes and found.stale:
            if plan.backend == "modal":
                from volembed_runner.backends.modal.volume_files import lease_store
                leases = lease_store(plan)
            else:
                from volembed_runner.store import lease_dir
                leases = FileLeaseStore(lease_dir(plan.local_root(), plan.name))
            with held(leases, Holder.here(plan.backend)):  # no pass of this run writes while gc deletes
                found = stale_folders(plan, files)
                remove_stale(files, found.stale)
    if as_json:
        sys.stdout.write(json.dumps({**found.to_dict(), "removed": yes}, indent=2) + "\n")
        return
    print_gc(found, out_console(), removed=yes)


@app.command("fetch")
def fetch_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    shard: Annotated[str | None, typer.Option(metavar="K", help="This chunk shard (3 or 00003; default: the "
                                              "first).")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every shard, into one file.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="PATH",
                                                help="Write here (default: ./<name>-shard-<K>.<format>).")] = None,
    fmt: Annotated[str, typer.Option("--format", metavar="parquet|jsonl", help="The file's format.")] = "parquet",
    sets: SetOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write the run's chunks joined with their vectors (and text) to a local file, off the local or Modal volume."""
    from volembed_runner.fetch import fetch
    from volembed_runner.ui.results import DownloadProgress, print_fetched

    with _one_line_errors(debug):
        if shard is not None and every:
            raise SpecError([_option_issue("--shard", "give --shard K or --all, not both")])
        plan = _load(spec, sets)
        files, _ = _volume(plan)
        with DownloadProgress(err_console(), quiet=as_json) as progress:
            fetched = fetch(plan, files, shard=shard, every=every, out=output, fmt=fmt, on_progress=progress)
    if as_json:
        sys.stdout.write(json.dumps(fetched.to_dict(), indent=2) + "\n")
        return
    print_fetched(fetched, out_console())


@app.command("search")
def search_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).", dir_okay=False)],
    query: Annotated[str, typer.Argument(help="The text to search for.")],
    k: Annotated[int, typer.Option("-k", "--top", metavar="N", help="How many chunks to return.")] = 10,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The run's chunks nearest QUERY (cosine; MaxSim over the token index for a late-interaction run), embedded
    with the run's model and its query-side prefix."""
    from volembed_runner.search import MAX_K, search
    from volembed_runner.ui.results import print_search

    with _one_line_errors(debug):
        if not query.strip():
            raise SpecError([_option_issue("QUERY", "is empty; give the text to search for")])
        if not 1 <= k <= MAX_K:
            raise SpecError([_option_issue("-k", f"must be between 1 and {MAX_K:,}, got {k}")])
        plan = _load(spec, sets)
        files, _ = _volume(plan)
        result = search(plan, files, query, k=k)
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return
    print_search(result, out_console())


@app.command("report")
def report_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="PATH",
                                                help="Write the page here (default: ./<name>-report.html).")] = None,
    sets: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Write an HTML report of the run (histograms, tiny chunks, failures, timings, estimate vs measured) and a PNG
    of its token histogram."""
    from volembed_runner.report import build_report, recompute_estimate
    from volembed_runner.ui.report import write_report
    from volembed_runner.ui.results import print_report

    with _one_line_errors(debug):
        plan = _load(spec, sets)
        files, _ = _volume(plan)
        estimate, why_not = recompute_estimate(plan)
        report = build_report(plan, files, estimate=estimate, estimate_error=why_not)
        paths = write_report(report, output or Path(f"{plan.name}-report.html"))
    print_report(paths, out_console())


@app.command("push")
def push_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    repo: Annotated[str | None, typer.Option(metavar="OWNER/NAME", help="The Hub dataset repository (default: "
                                             "output.hub.repo).")] = None,
    private: Annotated[bool | None, typer.Option("--private/--public", help="Create the repository private "
                                                 "(default: output.hub.private, else public).")] = None,
    license_id: Annotated[str | None, typer.Option("--license", metavar="ID", help="The card's license "
                                                   "(default: output.hub.license, else the source's).")] = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Upload the run's current chunk and embedding files to the Hub with a generated dataset card."""
    from volembed_runner.publish import push_run
    from volembed_runner.ui.results import print_pushed

    with _one_line_errors(debug):
        plan = _load(spec, sets)
        hub = _hub_settings(plan, repo, private, license_id)
        if plan.backend == "modal":
            from volembed_runner.backends.modal.publish import push_on_modal
            pushed = push_on_modal(plan, hub)
        else:
            pushed = push_run(plan.local_root(), plan, hub)
    if as_json:
        sys.stdout.write(json.dumps(pushed.to_dict(), indent=2) + "\n")
        return
    print_pushed(pushed, out_console())


def _hub_settings(plan: Plan, repo: str | None, private: bool | None, license_id: str | None) -> HubSettings:
    """The spec's `output.hub` with the command line's options over it, validated as the spec's field is."""
    from pydantic import ValidationError

    from volembed_runner.plan import HubSettings
    from volembed_runner.spec import Hub

    base = plan.hub or HubSettings(repo="")
    fields = {"repo": repo or base.repo, "private": base.private if private is None else private,
              "secret": base.secret, "license": license_id or base.license}
    if not fields["repo"]:
        raise SpecError([_option_issue("--repo", "name the dataset repository OWNER/NAME (or set output.hub.repo "
                                                 "in the spec)")])
    try:
        return HubSettings(**Hub(**fields).model_dump())
    except ValidationError as exc:
        raise SpecError([_option_issue("--repo", f"must be OWNER/NAME, got {fields['repo']!r}")]) from exc


def main() -> None:
    """Console-script entry point."""
    app()
