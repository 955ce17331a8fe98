"""The `docroute` command: run a job, run the bundled demo, or check a job file."""

from __future__ import annotations

import os
import sys
import time
from importlib.resources import as_file, files
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

_QUIET_PREFECT = {
    # no analytics or update checks leave this machine; the ephemeral API needs no server of the user's
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def _quiet_prefect() -> None:
    for key, value in _QUIET_PREFECT.items():
        os.environ.setdefault(key, value)


def _print_summary(summary: dict[str, Any], seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    console.print(f"[bold]{summary['job']}[/bold]: {summary['documents']} documents in {seconds:.1f} s")
    routes = Table()
    routes.add_column("route")
    routes.add_column("documents", justify="right")
    routes.add_column("cost (USD)", justify="right")
    cost_by_route: dict[str, float] = {}
    for entry in summary["entries"]:
        cost_by_route[entry.route] = cost_by_route.get(entry.route, 0.0) + entry.cost_usd
    for route in ("small", "frontier", "deferred", "error"):
        routes.add_row(route, str(summary[route]), f"{cost_by_route.get(route, 0.0):.6f}")
    routes.add_row("total", str(summary["documents"]), f"{summary['cost_usd']:.6f}", style="bold")
    console.print(routes)
    if summary["all_frontier_usd"] is not None:
        console.print(
            f"all-frontier estimate ${summary['all_frontier_usd']:.6f}"
            + (f" · savings {summary['savings_pct']:.1f}%" if summary["savings_pct"] is not None else "")
        )
    results = {Path(p["url"]).parent.as_posix() for p in summary["parts"]}
    console.print(f"results: {', '.join(sorted(results)) or '(no documents)'}")
    console.print(f"costs:   {summary['costs']}")
    console.print(f"manifest: {summary['manifest']}")


def _run(job: Path, output: str | None = None) -> dict[str, Any]:
    from docroute.flows.process import process_documents
    from docroute.schemas.load import JobSpecError, load_job

    try:
        load_job(job)  # fail fast, before Prefect starts, with the spec's own error message
    except JobSpecError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    return process_documents(str(job), output=output)


@app.command()
def run(
    job: Annotated[Path, typer.Argument(help="the job's YAML file")],
    output: Annotated[str | None, typer.Option(help="write here instead of the job's output.url")] = None,
) -> None:
    """Run a job: classify and/or extract every document, write Parquet and the cost ledger."""
    _quiet_prefect()
    started = time.perf_counter()
    summary = _run(job, output)
    _print_summary(summary, time.perf_counter() - started)


@app.command()
def validate(job: Annotated[Path, typer.Argument(help="the job's YAML file")]) -> None:
    """Check a job file and print it with secrets masked."""
    import json

    from docroute.schemas.load import JobSpecError, load_job

    try:
        spec = load_job(job)
    except JobSpecError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(spec.redacted(), indent=2))


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="where the demo writes its results")] = Path("demo-output"),
    job: Annotated[str, typer.Option(help="which bundled job: classify, extract or all")] = "all",
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
            summary = _run(Path(examples) / f"demo_{name}.yaml", str(workdir))
            _print_summary(summary, time.perf_counter() - started)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
