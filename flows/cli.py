"""The `docroute` command: run a job, run the bundled demo, or check a job file."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from datetime import date, datetime
from enum import StrEnum
from importlib.resources import as_file, files
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from typer.core import TyperGroup

from docroute.schemas.errors import DocrouteError

if TYPE_CHECKING:
    from rich.table import Table

    from docroute.flows.prefect_api import ApiStart
    from docroute.schemas.spec import JobSpec
    from docroute.schemas.summary import RunSummary


class _DocrouteCommands(TyperGroup):
    """Every command ends alike on an error docroute raised on purpose: its message on stderr, no traceback, and
    the exit code of its kind (schemas/errors.py ExitCode), so a scheduler can tell "fix the job" (2) from
    "another run holds the output" (3), the source (4), the storage (5), an engine (6) and "try later" (75)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DocrouteError as exc:
            typer.echo(f"docroute: {exc}", err=True)
            raise typer.Exit(int(exc.exit_code)) from None


app = typer.Typer(cls=_DocrouteCommands, add_completion=False, no_args_is_help=True, help=__doc__)

_QUIET_PREFECT = {
    # no analytics or update checks leave this machine; the ephemeral API needs no server of the user's
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",  # quiet terminal; the API (the UI) still gets INFO
    # the ephemeral API's first start on a machine creates its database (13 s on 2 idle cores; more when busy):
    # Prefect's 20 s default fails a scheduled run on a loaded node for no fault of the job
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def _quiet_prefect() -> None:
    for key, value in _QUIET_PREFECT.items():
        os.environ.setdefault(key, value)


def _print_summary(summary: RunSummary, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    console.print(
        f"[bold]{summary.job}[/bold]: {summary.documents} documents processed in {seconds:.1f} s "
        f"({summary.up_to_date} up to date, skipped)"
    )
    routes = Table()
    routes.add_column("route")
    routes.add_column("documents", justify="right")
    routes.add_column("cost (USD)", justify="right")
    cost_by_route: dict[str, float] = {}
    for entry in summary.entries:
        cost_by_route[entry.route] = cost_by_route.get(entry.route, 0.0) + entry.cost_usd
    by_route = (
        ("small", summary.small),
        ("frontier", summary.frontier),
        ("deferred", summary.deferred),
        ("error", summary.error),
    )
    for route, documents in by_route:
        routes.add_row(route, str(documents), f"{cost_by_route.get(route, 0.0):.6f}")
    routes.add_row("total", str(summary.documents), f"{summary.cost_usd:.6f}", style="bold")
    console.print(routes)
    if summary.all_frontier_usd is not None:
        console.print(
            f"all-frontier estimate ${summary.all_frontier_usd:.6f}"
            + (f" · savings {summary.savings_pct:.1f}%" if summary.savings_pct is not None else "")
        )
    results = {Path(part.url).parent.as_posix() for part in summary.parts}
    console.print(f"results: {', '.join(sorted(results)) or '(no documents)'}")
    console.print(f"costs:   {summary.costs}")
    console.print(f"manifest: {summary.manifest}")
    if summary.classification:
        console.print(f"classification: {summary.classification['summary']}")


def _check_job(job: Path) -> None:
    """Fail fast, before Prefect starts, with the spec's own error message."""
    from docroute.schemas.load import load_job

    load_job(job)


def _check_job_and_start_api(job: Path) -> ApiStart:
    """Validate the job, then start Prefect's ephemeral API while the caller imports its flow (wait before it runs)."""
    from docroute.flows.prefect_api import start_ephemeral_api_early

    _check_job(job)
    return start_ephemeral_api_early()


@contextlib.contextmanager
def _flow_run_of_this_process(api: ApiStart) -> Iterator[None]:
    """Wait for the API, then let the flow run created inside name this process, so that a later run on this
    machine can mark it Crashed if the process is killed (flows/run_liveness.py); show progress bars while it runs
    when stderr is a terminal (tasks/account/progress.py)."""
    from docroute.flows.run_liveness import tagged_with_this_process
    from docroute.tasks.account.progress import terminal_console, terminal_progress

    api.wait()
    with tagged_with_this_process(), terminal_progress(terminal_console()):
        yield


def _run(job: Path, output: str | None = None, full_refresh: bool = False, compact: bool = False) -> RunSummary:
    api = _check_job_and_start_api(job)
    from docroute.flows.process import process_documents

    with _flow_run_of_this_process(api):
        return process_documents(str(job), output=output, full_refresh=full_refresh, compact=compact)


@app.command()
def run(
    job: Annotated[Path, typer.Argument(help="the job's YAML file")],
    output: Annotated[str | None, typer.Option(help="write here instead of the job's output.url")] = None,
    full_refresh: Annotated[
        bool, typer.Option("--full-refresh", help="reprocess every document, not only new and changed ones")
    ] = False,
    compact: Annotated[
        bool, typer.Option("--compact", help="then compact the output, as `docroute compact` does")
    ] = False,
) -> None:
    """Run a job: classify and/or extract new and changed documents, write Parquet and the cost ledger."""
    _quiet_prefect()
    started = time.perf_counter()
    summary = _run(job, output, full_refresh, compact)
    _print_summary(summary, time.perf_counter() - started)


def _check_candidates(candidates: Path) -> None:
    """Fail fast, before Prefect starts, naming the candidates file's bad entry and line."""
    from docroute.schemas.candidates import load_candidates

    load_candidates(candidates)


def _print_candidates(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    table = Table(title=f"small-model candidates (cost per 1,000 documents; frontier {result['frontier_model']})")
    table.add_column("candidate")
    table.add_column("small model")
    for column in ("accuracy", "escalation", "small USD", "frontier USD", "total USD"):
        table.add_column(column, justify="right")
    table.add_column("verdict")
    for verdict in result["candidates"]:
        row = verdict.to_json()

        def num(key: str, fmt: str, row: dict[str, Any] = row) -> str:
            return "-" if row[key] is None else format(row[key], fmt)

        strategy = row["classify_strategy"] + (f"/{row['encoder']}" if row["encoder"] else "")
        table.add_row(
            row["name"],
            f"{row['engine']}: {row['model']} ({strategy})",
            num("accuracy", ".1%"),
            num("escalation_rate", ".1%"),
            num("small_cost_per_1000", ".4g"),
            num("frontier_cost_per_1000", ".4g"),
            num("cost_per_1000", ".4g"),
            row["outcome"],
        )
    console.print(table)
    console.print(f"all-frontier: ${result['all_frontier_cost_per_1000']:.4g} per 1,000 documents")
    for verdict in result["candidates"]:
        console.print(f"  {verdict.name}: {verdict.outcome.value}: {verdict.why}", markup=False)
    console.print(result["notice"], markup=False)
    if result["job_file_change"]:
        console.print(result["job_file_change"].rstrip(), markup=False, highlight=False)


@app.command()
def calibrate(
    job: Annotated[Path, typer.Argument(help="the job's YAML file")],
    labels: Annotated[str | None, typer.Option(help="gold answers: csv/jsonl/parquet with a path column")] = None,
    oracle: Annotated[str | None, typer.Option(help="'frontier': label a random sample with the frontier")] = None,
    sample: Annotated[int, typer.Option(help="documents the oracle labels")] = 200,
    output: Annotated[str | None, typer.Option(help="write the router here instead of the job's output.url")] = None,
    candidates: Annotated[
        Path | None,
        typer.Option(
            help="YAML list of {name, small_model} to compare with the job's own small model: the cheapest that "
            "meets the target wins and its router is written"
        ),
    ] = None,
    frontier_model: Annotated[
        str | None, typer.Option(help="with --candidates: price escalations at this model (default: the job's)")
    ] = None,
) -> None:
    """Certify routing thresholds (accuracy >= target with probability >= 1 - delta) and write router.json."""
    _quiet_prefect()
    _check_job(job)
    if candidates is not None:
        _check_candidates(candidates)
    elif frontier_model is not None:
        typer.echo("--frontier-model prices the candidates' escalations: it goes with --candidates", err=True)
        raise typer.Exit(2)
    from docroute.flows.prefect_api import start_ephemeral_api_early

    api = start_ephemeral_api_early()
    from rich.console import Console

    from docroute.flows.calibrate import calibrate as calibrate_flow

    with _flow_run_of_this_process(api):
        result = calibrate_flow(
            str(job),
            labels=labels,
            oracle=oracle,
            sample=sample,
            output=output,
            candidates=str(candidates) if candidates is not None else None,
            frontier_model=frontier_model,
        )
    router = result["router"]
    console = Console(soft_wrap=True)
    console.print(
        f"router {router.version}: {router.sample_size} labeled documents, target {router.target_accuracy} "
        f"with probability >= {1 - router.delta:.3f}"
    )
    for part, cert in router.certificates.items():
        threshold = "none: always escalate" if cert.threshold is None else f"{cert.threshold:.3f}"
        console.print(
            f"  {part}: threshold {threshold}, kept {cert.kept}/{cert.n}, escalation {cert.escalation_rate:.1%}"
        )
    console.print(f"written to {result['url']}")
    if candidates is not None:
        _print_candidates(result)


@app.command()
def train(
    job: Annotated[Path, typer.Argument(help="the job's YAML file")],
    output: Annotated[str | None, typer.Option(help="labels and heads live here, not output.url")] = None,
    min_holdout: Annotated[int, typer.Option(help="held-out labels needed before a head is compared")] = 30,
) -> None:
    """Refit the classification head on the job's examples and the frontier's labels; promote it only if better."""
    _quiet_prefect()
    api = _check_job_and_start_api(job)
    from rich.console import Console

    from docroute.flows.train import train as train_flow

    with _flow_run_of_this_process(api):
        result = train_flow(str(job), output=output, min_holdout=min_holdout)
    console = Console(soft_wrap=True)
    console.print(
        f"round {result['version']}: {result['harvested']} labels ({result['distinct']} distinct), trained on "
        f"{result['train_examples']} examples + {result['train_labels']} labels, {result['holdout']} held out"
    )
    console.print(result["decision"])
    console.print(f"fine-tuning set: {result['finetune']['train']}")


@app.command()
def evaluate(
    job: Annotated[Path, typer.Argument(help="the job's YAML file")],
    labels: Annotated[str, typer.Option(help="gold answers: csv/jsonl/parquet with a path column")],
    report: Annotated[Path, typer.Option(help="folder for report.md, metrics.json and the plot")],
    frontier: Annotated[
        str, typer.Option(help="gold: the labels play the frontier; call: real frontier calls")
    ] = "gold",
    frontier_model: Annotated[str | None, typer.Option(help="price escalations as this model")] = None,
    output: Annotated[str | None, typer.Option(help="read the router from here instead of output.url")] = None,
) -> None:
    """Accuracy of small-only, frontier-only and routed answers, escalation rate, cost per 1,000 documents."""
    _quiet_prefect()
    api = _check_job_and_start_api(job)
    from docroute.flows.evaluate import evaluate_job

    with _flow_run_of_this_process(api):
        result = evaluate_job(
            str(job), labels=labels, report=str(report), frontier=frontier, frontier_model=frontier_model, output=output
        )
    metrics = result["metrics"]
    routed = metrics["routed"]
    typer.echo(
        f"{metrics['n_documents']} documents · small-only accuracy {metrics['small_only']['accuracy']:.3f} · routed "
        f"{routed['accuracy']:.3f} at {routed['escalation_rate']:.1%} escalation · report: {result['files']['report']}"
    )


@app.command()
def unlock(
    job: Annotated[Path, typer.Argument(help="the job's YAML file")],
    output: Annotated[str | None, typer.Option(help="the output to unlock instead of the job's output.url")] = None,
) -> None:
    """End the output's lease now, for a run that died on a host this machine cannot see (normally not needed:
    a dead run's lease lapses after output.lease_ttl_s and the next run takes over by itself)."""
    from docroute.schemas.load import load_job, with_output
    from docroute.tasks.store.lease import force_release

    _check_job(job)
    spec = with_output(load_job(job), output)
    ended = force_release(spec.output, "docroute unlock")
    if ended is None:
        typer.echo(f"{spec.output.url}: no run holds the lease")
        return
    typer.echo(
        f"ended the lease of {ended.describe()} on {spec.output.url}; if that run is still alive it stops before "
        "committing, and the next run resumes its work"
    )


@app.command()
def compact(
    job: Annotated[Path, typer.Argument(help="the job's YAML file")],
    output: Annotated[str | None, typer.Option(help="compact this output instead of the job's output.url")] = None,
    retention: Annotated[
        str | None,
        typer.Option(help="keep replaced and leftover files this long (hours, or 90m, 12h, 7d; 0: delete at once)"),
    ] = None,
    target_mb: Annotated[float | None, typer.Option(help="size of the coalesced results files, in MiB")] = None,
) -> None:
    """Compact the output: coalesce each run date's small results parts, optimize and vacuum the current table,
    and delete what no reader and no resumable run needs once older than the retention period (exit 3 while a
    run holds the output)."""
    from docroute.tasks.store.compact import describe, parse_retention_hours

    hours = parse_retention_hours(retention) if retention is not None else None
    _quiet_prefect()
    api = _check_job_and_start_api(job)
    from docroute.flows.compact import compact_output

    with _flow_run_of_this_process(api):
        report = compact_output(str(job), output=output, retention_hours=hours, target_file_mb=target_mb)
    for line in describe(report):
        typer.echo(line)


class OutputFormat(StrEnum):
    """How `docroute sql` prints rows."""

    table = "table"
    csv = "csv"
    json = "json"


def _job_spec(job: Path, output: str | None) -> JobSpec:
    """The job's spec, reading `--output` instead of its output.url when given (without importing the flows)."""
    from docroute.schemas.load import load_job, with_output

    return with_output(load_job(job), output)


def _cell(value: Any) -> str:
    """A value as text for a table or CSV cell: empty for null, ISO for times, JSON for lists and structs."""
    import json

    if value is None:
        return ""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list | dict):
        return json.dumps(value, default=str)
    return str(value)


_NO_WRAP = frozenset({"run_id", "doc_id"})
"""Ids a person copies whole: a narrow terminal squeezes the other columns instead."""


def _rich_table(columns: list[str], rows: list[tuple[Any, ...]], title: str | None = None) -> Table:
    """Values are plain text, never rich markup: a file named `[red]x` shows as itself."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(Text(column), overflow="fold", no_wrap=column in _NO_WRAP)
    for row in rows:
        table.add_row(*(Text(_cell(value)) for value in row))
    return table


def _print_rows(columns: list[str], rows: list[tuple[Any, ...]], how: OutputFormat) -> None:
    """Rows as a rich table, CSV with a header, or one JSON object per line."""
    if how is OutputFormat.table:
        from rich.console import Console

        Console().print(_rich_table(columns, rows))
    elif how is OutputFormat.csv:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_cell(value) for value in row] for row in rows)
    else:
        import json

        for row in rows:
            sys.stdout.write(json.dumps(dict(zip(columns, row, strict=True)), default=str) + "\n")


@app.command()
def sql(
    job: Annotated[Path, typer.Argument(help="the job's YAML file")],
    query: Annotated[
        str, typer.Argument(help="DuckDB SQL over the views documents, results, costs and runs", metavar="SQL")
    ],
    output: Annotated[str | None, typer.Option(help="read this output instead of the job's output.url")] = None,
    output_format: Annotated[
        OutputFormat | None,
        typer.Option(
            "--format", help="table, csv or json (one object per line); default: table in a terminal, csv when piped"
        ),
    ] = None,
) -> None:
    """Query a job's output with DuckDB: documents (one current row each), results (the whole history), costs and
    runs (the ledger), over committed files only."""
    from docroute.tasks.account.views import open_views, run_query

    result = run_query(open_views(_job_spec(job, output)), query)
    if result.columns:
        how = output_format or (OutputFormat.table if sys.stdout.isatty() else OutputFormat.csv)
        _print_rows(result.columns, result.rows, how)


@app.command()
def show(
    job: Annotated[Path, typer.Argument(help="the job's YAML file")],
    output: Annotated[str | None, typer.Option(help="read this output instead of the job's output.url")] = None,
    least_confident: Annotated[int, typer.Option(min=0, help="current rows to list, least confident first")] = 10,
    runs: Annotated[int, typer.Option(min=0, help="latest committed runs to list")] = 5,
) -> None:
    """Where a job stands: documents by route and outcome, spend against all-frontier, the last runs and the
    least confident answers the small model kept."""
    from rich.console import Console

    from docroute.schemas.pricing import format_usd
    from docroute.tasks.account.views import open_views, overview

    spec = _job_spec(job, output)
    seen = overview(open_views(spec), least_confident=least_confident, last_runs=runs, source_url=spec.source.url)
    console = Console(soft_wrap=True)
    console.print(
        f"[bold]{spec.name}[/bold]: {seen.documents} current documents, {seen.committed_runs} committed runs",
        highlight=False,
    )
    console.print(f"output: {spec.output.url}", markup=False, highlight=False)
    if not seen.committed_runs:
        console.print("nothing committed yet: `docroute run` the job first", markup=False)
        return
    console.print(_rich_table(seen.routes.columns, seen.routes.rows, "documents by route"))
    total, small, frontier, all_frontier, savings = seen.spend.rows[0]
    line = (
        f"spend: {format_usd(total or 0.0)} ({format_usd(small or 0.0)} small, {format_usd(frontier or 0.0)} frontier)"
    )
    if all_frontier is not None:
        line += f" · all-frontier {format_usd(all_frontier)}"
        line += f" · savings {savings:.1f}%" if savings is not None else ""
    else:
        line += " · no all-frontier estimate (no frontier configured)"
    console.print(line, markup=False, highlight=False)
    if runs:  # lines, not a table: a run id is read whole, and a table of ids does not fit 80 columns
        console.print("latest committed runs, newest first:", markup=False)
        for run_id, started, documents, by_route, cost in seen.last_runs.rows:
            console.print(
                f"  {run_id}  {started} UTC  {documents} documents ({by_route or 'none'})  {format_usd(cost or 0.0)}",
                markup=False,
                highlight=False,
            )
    if not least_confident:
        return
    if seen.confidence_column is None:
        console.print("no confidence column in the current rows", markup=False)
    elif not seen.least_confident.rows:
        console.print("no current answer kept from the small model", markup=False)
    else:
        title = f"least confident answers kept from the small model (by {seen.confidence_column})"
        console.print(_rich_table(seen.least_confident.columns, seen.least_confident.rows, title))


@app.command()
def validate(job: Annotated[Path, typer.Argument(help="the job's YAML file")]) -> None:
    """Check a job file and print it with secrets masked."""
    import json

    from docroute.schemas.load import load_job

    spec = load_job(job)
    typer.echo(json.dumps(spec.redacted(), indent=2))


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="where the demo writes its results")] = Path("demo-output"),
    job: Annotated[str, typer.Option(help="which bundled job: classify, extract or all")] = "all",
    full_refresh: Annotated[
        bool, typer.Option("--full-refresh", help="reprocess every document (a re-run only processes changes)")
    ] = False,
) -> None:
    """Run the bundled examples on the embedded model (no API key, no network): local folders in, Parquet out."""
    _quiet_prefect()
    jobs = ["classify", "extract"] if job == "all" else [job]
    if not set(jobs) <= {"classify", "extract"}:
        typer.echo("--job must be classify, extract or all", err=True)
        raise typer.Exit(2)
    with as_file(files("docroute.examples")) as examples:
        for name in jobs:
            workdir = (output / name).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            summary = _run(Path(examples) / f"demo_{name}.yaml", str(workdir), full_refresh)
            _print_summary(summary, time.perf_counter() - started)


@app.command()
def setup(
    work_pool: Annotated[str, typer.Option(help="process work pool the deployments run on")] = "docroute-process",
    frontier_concurrency: Annotated[int, typer.Option(help="frontier calls in flight across all workers")] = 8,
    repository: Annotated[str | None, typer.Option(help="git URL the deployments clone")] = None,
    branch: Annotated[str | None, typer.Option(help="branch the deployments check out")] = None,
    job: Annotated[str | None, typer.Option(help="job file, relative to the clone")] = None,
    labels: Annotated[str | None, typer.Option(help="gold labels file for the weekly calibration")] = None,
) -> None:
    """Create (idempotently) the work pool, concurrency limit and variables deployments/prefect.yaml expects."""
    _quiet_prefect()
    from pydantic import ValidationError

    from docroute.flows.setup import SetupSpec, setup_prefect

    try:
        spec = SetupSpec(
            work_pool=work_pool,
            frontier_concurrency=frontier_concurrency,
            repository=repository,
            branch=branch,
            job=job,
            labels=labels,
        )
    except ValidationError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    report = setup_prefect(spec)
    for verb, items in (("created", report.created), ("updated", report.updated), ("kept", report.kept)):
        for item in items:
            typer.echo(f"{verb}: {item}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
