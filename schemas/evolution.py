"""Schema evolution: what happens to a job's answer columns when the job file changes between runs.

A job's *answer schema* is the part of its result schema the job declares: the classification's `label` (with its
label set) and one column per extracted field (with its Arrow type, and an enum's value set), each with its
`<name>_confidence` column. Every manifest records the answer schema its run wrote (`AnswerSchema.to_json`), plus
the columns retired by earlier runs and their types, so the next run can compare without reading any Parquet.

The rules, decided by `ChangeKind` (never by message text):

- a field added to the job is a new nullable column: older parts lack it (null when read by name), the current
  table gains it by schema evolution;
- a field removed from the job is *retired*: new parts lack it, the current table keeps the column (null for every
  row written from then on), and the record keeps its type, so the field can come back only with that type;
- a field whose type changed, an enum whose values changed, or a changed label set is refused (`SchemaChangeError`,
  an `InputError`: exit 2) unless the run says `--full-refresh`: rows already written hold answers of the old kind,
  and mixing the two in one column would silently mean two things. A full refresh reprocesses every document, so
  the current table is rewritten with the new type; the history keeps its old parts.

Manifests written before this record existed carry no schema: the first run after the upgrade is taken as
compatible (nothing to compare with) and records its schema for the runs after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import pyarrow as pa

from docroute.schemas.columns import field_confidence_column
from docroute.schemas.errors import InputError
from docroute.schemas.rows import CATEGORY, arrow_type
from docroute.schemas.spec import FieldSpec, JobSpec

SCHEMA_FORMAT = 1
"""The version of the manifest's `schema` entry; a reader refuses a format it does not know."""

LABEL_COLUMN = "label"
"""The classification's column (its confidence column is `label_confidence`, as for any field)."""

_DECLARED_OPTIONS = ("precision", "scale", "values")
"""The FieldSpec options that decide a field's Arrow type or its allowed values (recorded beside `type`)."""


class ColumnRole(StrEnum):
    """What a job-declared column holds."""

    LABEL = "label"  # the classification's label; its values are the label set
    FIELD = "field"  # an extracted field; an enum's values are its value set


class ChangeKind(StrEnum):
    """How one answer column differs between the committed schema and the job's."""

    ADDED = "added"  # a new nullable column
    RETIRED = "retired"  # gone from the job: the table keeps the column, null from then on
    RESTORED = "restored"  # a retired column declared again with the type it had
    TYPE_CHANGED = "type_changed"  # the Arrow type differs (str → int, decimal(12, 2) → decimal(14, 2), …)
    VALUES_CHANGED = "values_changed"  # a label set or an enum's value set differs


REFUSED: frozenset[ChangeKind] = frozenset({ChangeKind.TYPE_CHANGED, ChangeKind.VALUES_CHANGED})
"""Changes a run makes only with `--full-refresh`: the rows already written would mean something else."""


@dataclass(frozen=True, slots=True)
class AnswerColumn:
    """One job-declared column as a manifest records it: enough to rebuild its Arrow type without the job file."""

    name: str
    role: ColumnRole
    declared: Mapping[str, Any]  # the job's words for a field: {"type": "decimal", "precision": 12, "scale": 2}

    @property
    def values(self) -> tuple[str, ...] | None:
        """The label set or an enum's values (None for other fields)."""
        values = self.declared.get("values")
        return None if values is None else tuple(values)

    @property
    def arrow_type(self) -> pa.DataType:
        """The column's Arrow type in the results Parquet (labels and enums dictionary-encoded)."""
        if self.role is ColumnRole.LABEL:
            return CATEGORY
        return arrow_type(FieldSpec.model_validate({"name": self.name, **self.declared}))

    def describe_type(self) -> str:
        """The type as a person reads it: the job's word, then the Arrow type (`decimal(12, 2) (decimal128(12, 2))`)."""
        kind = str(self.declared.get("type", self.role.value))
        if kind == "decimal":
            kind = f"decimal({self.declared.get('precision')}, {self.declared.get('scale')})"
        return f"{kind} ({self.arrow_type})"

    def fields(self) -> list[pa.Field]:
        """The column and its confidence column, nullable."""
        return [
            pa.field(self.name, self.arrow_type, nullable=True),
            pa.field(field_confidence_column(self.name), pa.float64(), nullable=True),
        ]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role.value, "arrow": str(self.arrow_type), **dict(self.declared)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AnswerColumn:
        declared = {k: v for k, v in data.items() if k == "type" or k in _DECLARED_OPTIONS}
        return cls(str(data["name"]), ColumnRole(data["role"]), declared)


def _field_column(item: FieldSpec) -> AnswerColumn:
    declared: dict[str, Any] = {"type": item.type}
    if item.type == "decimal":
        declared |= {"precision": item.precision, "scale": item.scale}
    if item.values is not None:
        declared["values"] = list(item.values)
    return AnswerColumn(item.name, ColumnRole.FIELD, declared)


@dataclass(frozen=True, slots=True)
class AnswerSchema:
    """The answer columns a run wrote, in result-schema order, and the columns earlier runs retired."""

    columns: tuple[AnswerColumn, ...]
    retired: tuple[AnswerColumn, ...] = ()

    def column(self, name: str) -> AnswerColumn | None:
        """A live or retired column by name."""
        return next((c for c in (*self.columns, *self.retired) if c.name == name), None)

    def answer_fields(self) -> list[pa.Field]:
        """The live columns in result-schema order: label and its confidence, the fields, then their confidences."""
        labels = [c for c in self.columns if c.role is ColumnRole.LABEL]
        fields = [c for c in self.columns if c.role is ColumnRole.FIELD]
        return (
            [f for c in labels for f in c.fields()] + [c.fields()[0] for c in fields] + [c.fields()[1] for c in fields]
        )

    def retired_fields(self) -> list[pa.Field]:
        """The retired columns and their confidence columns (kept in the current table, null from then on)."""
        return [f for c in self.retired for f in c.fields()]

    def names(self) -> set[str]:
        """Every column name live or retired, confidences included."""
        return {f.name for f in (*self.answer_fields(), *self.retired_fields())}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SCHEMA_FORMAT,
            "columns": [c.to_json() for c in self.columns],
            "retired": [c.to_json() for c in self.retired],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AnswerSchema:
        if data.get("format") != SCHEMA_FORMAT:
            raise InputError(
                f"a manifest records its answer schema in format {data.get('format')!r}, which this docroute "
                f"(format {SCHEMA_FORMAT}) cannot read: upgrade docroute"
            )
        return cls(
            tuple(AnswerColumn.from_json(c) for c in data.get("columns", [])),
            tuple(AnswerColumn.from_json(c) for c in data.get("retired", [])),
        )


def answer_schema(spec: JobSpec) -> AnswerSchema:
    """The answer columns the job declares (nothing retired: that needs the committed record)."""
    columns: list[AnswerColumn] = []
    if spec.task.classify is not None:
        labels = {"type": "label", "values": list(spec.task.classify.label_names)}
        columns.append(AnswerColumn(LABEL_COLUMN, ColumnRole.LABEL, labels))
    if spec.task.extract is not None:
        columns += [_field_column(item) for item in spec.task.extract.fields]
    return AnswerSchema(tuple(columns))


@dataclass(frozen=True, slots=True)
class SchemaChange:
    """One column's change between the committed schema and the job's; `kind` decides, `describe` explains."""

    kind: ChangeKind
    name: str
    role: ColumnRole
    before: AnswerColumn | None = None
    after: AnswerColumn | None = None

    @property
    def refused(self) -> bool:
        """Whether the run needs `--full-refresh` to make this change."""
        return self.kind in REFUSED

    def describe(self) -> str:
        """One clause naming the column and, for a refused change, its old and new type or value set."""
        field = "`label`" if self.role is ColumnRole.LABEL else f"field `{self.name}`"
        match self.kind:
            case ChangeKind.ADDED:
                return f"{field} is new: a nullable column, null in rows written before"
            case ChangeKind.RETIRED:
                return f"{field} left the job: its column stays, null in rows written from now on"
            case ChangeKind.RESTORED:
                return f"{field} is back with the type it had: its column fills again"
            case ChangeKind.TYPE_CHANGED:
                assert self.before is not None and self.after is not None
                return f"{field} changed type from {self.before.describe_type()} to {self.after.describe_type()}"
            case ChangeKind.VALUES_CHANGED:
                assert self.before is not None and self.after is not None
                which = "the label set of" if self.role is ColumnRole.LABEL else "the values of enum"
                old, new = ", ".join(self.before.values or ()), ", ".join(self.after.values or ())
                return f"{which} {field} changed from [{old}] to [{new}]"
        raise AssertionError(self.kind)  # pragma: no cover - every kind is matched


def compare(committed: AnswerSchema, job: AnswerSchema) -> list[SchemaChange]:
    """How the job's answer columns differ from the committed record's (live and retired), column by column."""
    changes: list[SchemaChange] = []
    live = {c.name for c in committed.columns}
    for column in job.columns:
        before = committed.column(column.name)
        if before is None:
            changes.append(SchemaChange(ChangeKind.ADDED, column.name, column.role, after=column))
        elif before.arrow_type != column.arrow_type:
            changes.append(SchemaChange(ChangeKind.TYPE_CHANGED, column.name, column.role, before, column))
        elif sorted(before.values or ()) != sorted(column.values or ()):
            changes.append(SchemaChange(ChangeKind.VALUES_CHANGED, column.name, column.role, before, column))
        elif column.name not in live:
            changes.append(SchemaChange(ChangeKind.RESTORED, column.name, column.role, before, column))
    declared = {c.name for c in job.columns}
    changes += [
        SchemaChange(ChangeKind.RETIRED, c.name, c.role, before=c) for c in committed.columns if c.name not in declared
    ]
    return changes


class SchemaChangeError(InputError):
    """The job changed what a column holds (a type, an enum's values, the label set) without `--full-refresh`."""

    def __init__(self, job: str, changes: Sequence[SchemaChange]) -> None:
        self.changes = tuple(changes)
        super().__init__(
            f"job {job}: {'; '.join(c.describe() for c in self.changes)}. The rows already written hold the old "
            "answers, so this run would mix two meanings in one column: run again with --full-refresh to reprocess "
            "every document under the new schema (the current table is rewritten, the history keeps its parts), "
            "or undo the change in the job file"
        )


@dataclass(frozen=True, slots=True)
class Evolution:
    """What a run does to the answer schema: the record its manifest writes and the changes that lead to it."""

    schema: AnswerSchema
    changes: tuple[SchemaChange, ...] = ()


def evolve(committed: AnswerSchema | None, spec: JobSpec, *, full_refresh: bool) -> Evolution:
    """The answer schema this run records, given the newest committed one (None: nothing recorded yet).

    Raises SchemaChangeError naming every refused column unless `full_refresh`. The record keeps every column an
    earlier run wrote and the job no longer declares as retired, with its last type.
    """
    job = answer_schema(spec)
    if committed is None:
        return Evolution(job)
    changes = compare(committed, job)
    refused = [c for c in changes if c.refused]
    if refused and not full_refresh:
        raise SchemaChangeError(spec.name, refused)
    declared = {c.name for c in job.columns}
    retired = tuple(c for c in (*committed.columns, *committed.retired) if c.name not in declared)
    return Evolution(AnswerSchema(job.columns, retired), tuple(changes))
