"""SQL over one job's output: a DuckDB connection with the output's tables already defined as views.

`docroute sql` and `docroute show` read results, history and spend through the views made here, so a person
looks at a job without knowing where its files are or which of them are committed:

- `documents`: one current row per document (what `current_rows()` returns: the rows the newest state snapshot
  points at, documents whose file left the source excluded);
- `results`: every row of every committed part, the full history (parts the manifests name, never a glob, so an
  uncommitted or abandoned part is never counted, less the parts a compaction replaced with its files), read with
  `union_by_name` so parts written under different job specs (a field added, a task changed) read together, a
  column a part lacks being null there;
- `costs` and `runs`: the ledger files the committed manifests name (`tasks/account/report.py write_ledger`).

No DuckDB extension is installed or loaded here (a run may have no network, and an extension fetched at run time
is code nobody pinned): local outputs are read by DuckDB itself, any other store through the output's own fsspec
filesystem registered with the connection (the same credentials and endpoint a run uses), and the current rows
are handed over as Arrow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from fsspec.core import url_to_fs

from docroute.engines.base import one_line
from docroute.schemas.columns import ROUTES
from docroute.schemas.errors import InputError
from docroute.schemas.rows import result_schema
from docroute.schemas.spec import JobSpec, OutputSpec
from docroute.tasks.account.ledger import COST_SCHEMA, RUN_SCHEMA
from docroute.tasks.store.current import current_rows
from docroute.tasks.store.state import committed_manifests, live_parts

if TYPE_CHECKING:
    import duckdb

VIEWS: tuple[str, ...] = ("documents", "results", "costs", "runs")
"""The views every connection from `open_views` has, in the order `docroute sql --help` names them."""

_NO_EXTENSION_DOWNLOADS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
"""DuckDB would otherwise fetch httpfs on the first `s3://` path it meets; the output's fsspec store reads it."""

_ERROR_CHARS = 400


class QueryError(InputError):
    """The SQL a person gave cannot run (syntax, an unknown table or column, a type error): fix the query."""


@dataclass(frozen=True)
class CommittedFiles:
    """The files the committed manifests name, oldest commit first."""

    parts: list[str] = field(default_factory=list)
    costs: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class QueryResult:
    """What a query returned: its column names and its rows (an empty `columns` for a statement with no result)."""

    columns: list[str]
    rows: list[tuple[Any, ...]]


@dataclass(frozen=True)
class Overview:
    """What `docroute show` prints: each a query result over the views, plus the choice of confidence column."""

    documents: int
    committed_runs: int
    routes: QueryResult
    spend: QueryResult
    last_runs: QueryResult
    least_confident: QueryResult
    confidence_column: str | None


def committed_files(output: OutputSpec) -> CommittedFiles:
    """Every part and ledger file a committed manifest names (one pass over the manifests).

    The manifests are the commit: files of a run that died before its manifest, or that clean-up has not removed
    yet, are on storage but count nowhere, so nothing here lists `results/`, `costs/` or `runs/` directly.
    """
    manifests = [manifest for _, manifest in committed_manifests(output)]
    files = CommittedFiles(parts=live_parts(manifests))  # a compaction's files instead of the parts they replaced
    for manifest in manifests:
        files.costs.extend([manifest["costs"]] if manifest.get("costs") else [])
        files.runs.extend([manifest["runs"]] if manifest.get("runs") else [])
    return files


def current_documents(spec: JobSpec) -> pa.Table:
    """The `documents` view's rows: one current row per document, as Arrow (empty, no columns, before a commit).

    The one place that says where current rows come from. An Iceberg current table that holds the newest committed
    run is read (a pyiceberg scan, handed to DuckDB as Arrow: no `iceberg` extension), so `docroute sql` shows what
    a warehouse reading that table sees; one that lags or is missing is passed over for the committed state itself.
    """
    output = spec.output
    if output.table.enabled and output.table.format == "iceberg":
        rows = _iceberg_documents(spec)
        if rows is not None:
            return rows
    return current_rows(output).to_arrow()


def _iceberg_documents(spec: JobSpec) -> pa.Table | None:
    """The Iceberg table's current rows, or None unless it holds the newest committed run."""
    import pyarrow.compute as pc

    from docroute.tasks.store.iceberg_table import read_iceberg_table
    from docroute.tasks.store.table import committed_runs, newest_with_state

    newest = newest_with_state(spec.output, committed_runs(spec.output))
    found = read_iceberg_table(spec) if newest is not None else None
    if newest is None or found is None or found[1] != newest[0].version:
        return None
    rows = found[0]
    return rows.filter(pc.is_null(rows["deleted_at"])).drop_columns(["deleted_at"])


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _define(con: duckdb.DuckDBPyConnection, view: str, urls: Sequence[str], empty: pa.Schema) -> None:
    """`view` over these Parquet files by column name, or over no rows of `empty`'s columns when there are none
    (a query that names a column then runs on an output with no commit yet, and counts nothing)."""
    if urls:
        listed = ", ".join(_sql_string(url) for url in urls)
        con.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet([{listed}], union_by_name = true)")
    else:
        con.register(view, empty.empty_table())


def open_views(spec: JobSpec) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection over `spec.output` with `documents`, `results`, `costs` and `runs` defined.

    The views read storage when a query runs (except `documents`, read once here), so a connection sees what was
    committed when it was opened plus later changes to those same files, never a later run's parts.
    """
    import duckdb

    con = duckdb.connect(config=dict(_NO_EXTENSION_DOWNLOADS))
    fs, _ = url_to_fs(spec.output.url, **spec.output.fsspec_options())
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & {"file", "local"}:  # DuckDB reads local files itself, faster than through Python
        con.register_filesystem(fs)
    schema = result_schema(spec)
    documents = current_documents(spec)
    con.register("documents", documents if documents.num_columns else schema.empty_table())
    files = committed_files(spec.output)
    _define(con, "results", files.parts, schema)
    _define(con, "costs", files.costs, COST_SCHEMA)
    _define(con, "runs", files.runs, RUN_SCHEMA)
    return con


def _message(exc: Exception) -> str:
    """DuckDB's message on one line: its kind and sentence, with any "Did you mean" hint, without the quoted query
    and caret that follow (`LINE 1: ...`), which say nothing on one line."""
    lines = []
    for line in str(exc).splitlines():
        if line.startswith("LINE "):
            break
        lines.append(line)
    return one_line(" ".join(lines) or str(exc), _ERROR_CHARS)


def run_query(con: duckdb.DuckDBPyConnection, sql: str, parameters: Sequence[Any] = ()) -> QueryResult:
    """Run a person's SQL; a query DuckDB refuses becomes a `QueryError` with its one-line message."""
    import duckdb

    try:
        cursor = con.execute(sql, list(parameters)) if parameters else con.execute(sql)
        if cursor.description is None:
            return QueryResult([], [])
        return QueryResult([d[0] for d in cursor.description], cursor.fetchall())
    except duckdb.Error as exc:
        raise QueryError(f"SQL error: {_message(exc)}") from None


def _columns(con: duckdb.DuckDBPyConnection, view: str) -> list[str]:
    description = con.execute(f"SELECT * FROM {view} LIMIT 0").description
    return [d[0] for d in description or []]


def confidence_column(columns: Sequence[str]) -> str | None:
    """The per-document confidence `show` ranks by: `confidence`, else `label_confidence`, else none.

    `confidence` is the small model's confidence in its least confident required part (the label, or a required
    field), so it is the one number per document for every task kind, and the number routing compared with the
    threshold. Parts written before it existed carry only `label_confidence` (classification), which is the same
    number there. Per-field `<field>_confidence` columns describe one field each and are not ranked.
    """
    return next((c for c in ("confidence", "label_confidence") if c in columns), None)


def overview(
    con: duckdb.DuckDBPyConnection, *, least_confident: int = 10, last_runs: int = 5, source_url: str | None = None
) -> Overview:
    """Counts by route and outcome, spend, the last runs and the least confident rows of a connection's views.

    The least confident rows are those whose kept answer is the small model's (`small`, `deferred`): a frontier
    row's confidence is the small model's, which the frontier's answer replaced, and error rows have none, so
    ranking them would bury the answers a person may want to check under rows already escalated. Their
    `document` is the file's path under `source_url` when it lies there (a terminal's width goes to the name).
    """
    columns = _columns(con, "documents")
    outcome = "route_outcome" if "route_outcome" in columns else "NULL"
    routes = run_query(
        con,
        f"SELECT route, {outcome} AS route_outcome, count(*) AS documents FROM documents "
        "GROUP BY ALL ORDER BY route, documents DESC",
    )
    spend = run_query(
        con,
        "SELECT sum(cost_usd) AS cost_usd, sum(small_cost_usd) AS small_usd, sum(frontier_cost_usd) AS frontier_usd, "
        "sum(all_frontier_usd) AS all_frontier_usd, "
        "100 * (1 - sum(cost_usd) FILTER (WHERE all_frontier_usd IS NOT NULL) / nullif(sum(all_frontier_usd), 0)) "
        "AS savings_pct FROM runs",
    )
    recent = run_query(
        con,
        "SELECT run_id, strftime(started_at, '%Y-%m-%d %H:%M') AS started, documents, concat_ws(', ', "
        + ", ".join(f"CASE WHEN {r} > 0 THEN '{r} ' || {r} END" for r in ROUTES)
        + f") AS routes, round(cost_usd, 6) AS cost_usd FROM runs ORDER BY started_at DESC LIMIT {int(last_runs)}",
    )
    ranked = confidence_column(columns)
    least = QueryResult([], [])
    if ranked is not None:
        base = (source_url or "\0").rstrip("/") + "/"
        document = (
            "CASE WHEN starts_with(source_uri, $1) THEN substr(source_uri, length($1) + 1) "
            "WHEN starts_with(source_uri, $2) THEN substr(source_uri, length($2) + 1) ELSE source_uri END AS document"
        )
        shown = [c for c in ("record_key", "route", "label") if c in columns]
        least = run_query(
            con,
            f"SELECT {', '.join([document, *shown, f'round({ranked}, 3) AS {ranked}'])} FROM documents "
            f"WHERE route IN ('small', 'deferred') AND {ranked} IS NOT NULL "
            f"ORDER BY {ranked}, source_uri, record_key LIMIT {int(least_confident)}",
            [base, f"file://{base}"],
        )
    counts = con.execute("SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM runs)").fetchone()
    assert counts is not None
    return Overview(
        documents=int(counts[0]),
        committed_runs=int(counts[1]),
        routes=routes,
        spend=spend,
        last_runs=recent,
        least_confident=least,
        confidence_column=ranked,
    )
