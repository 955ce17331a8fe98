"""The small models `docroute calibrate --candidates` compares: a YAML list of `{name, small_model}` entries.

Each `small_model` is validated by the very model a job file's `small_model` is (schemas/spec.py), so a candidate
that loads here is one a job can run; local paths in it (a GGUF `model_path`, a LoRA) are taken from the candidates
file's folder, as a job file's are from its own, and `${NAME}` references are resolved from the environment. Errors
name the entry (its position and name) and the line, so a long file is fixed in one pass.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, RootModel, field_validator

from docroute.schemas.load import YamlFileError, read_yaml_file, validate_yaml
from docroute.schemas.spec import SmallModelSpec, StrictModel

JOB_CANDIDATE = "job"
"""The name of the job file's own small model, always the first candidate (so it cannot name another entry)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class CandidatesFileError(YamlFileError):
    """A candidates file that cannot be used; its problems name the entry (position and name) and line."""

    heading = "invalid candidates file"
    what = "candidates file"


class SmallModelCandidate(StrictModel):
    """One small model to compare with the job's own: a name for the report and a job file's `small_model`."""

    name: str = Field(description="names the candidate in the report; letters, digits, '-', '_' or '.'")
    small_model: SmallModelSpec

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError("a candidate name is 1-63 letters, digits, '-', '_' or '.', starting alphanumeric")
        if name == JOB_CANDIDATE:
            raise ValueError(f"{JOB_CANDIDATE!r} is the job file's own small model; give this candidate another name")
        return name


class CandidateList(RootModel[list[SmallModelCandidate]]):
    """The whole file: at least one candidate, names distinct (the report and the verdicts are keyed by name)."""

    root: list[SmallModelCandidate] = Field(min_length=1)

    @field_validator("root")
    @classmethod
    def _distinct(cls, candidates: list[SmallModelCandidate]) -> list[SmallModelCandidate]:
        names = [c.name for c in candidates]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"candidate names listed twice: {', '.join(twice)}")
        return candidates


def _where(data: Any, loc: tuple[int | str, ...]) -> str:
    """`candidates[1] ('big').small_model.usd_per_hour`: the entry by position and name, then the field."""
    if not loc or not isinstance(loc[0], int):
        return ".".join(str(p) for p in loc) or "(top level)"
    index, rest = loc[0], loc[1:]
    entry = data[index] if isinstance(data, list) and 0 <= index < len(data) else None
    name = entry.get("name") if isinstance(entry, dict) else None
    label = f"candidates[{index}]" + (f" ({name!r})" if isinstance(name, str) else "")
    return ".".join([label, *(str(p) for p in rest)])


def _candidates_shape(data: Any) -> str | None:
    if isinstance(data, list) and data:
        return None
    return "the candidates file must be a non-empty YAML list of entries {name: ..., small_model: {...}}"


def parse_candidates(
    text: str, *, source: str = "<candidates>", base_dir: str | Path | None = None, env: Mapping[str, str] | None = None
) -> list[SmallModelCandidate]:
    """Validate YAML text as a list of candidates; `env` defaults to the process environment."""
    candidates = validate_yaml(
        text,
        CandidateList,
        CandidatesFileError,
        source=source,
        base_dir=base_dir,
        env=env,
        shape_problem=_candidates_shape,
        where=_where,
    )
    return candidates.root


def load_candidates(path: str | Path, *, env: Mapping[str, str] | None = None) -> list[SmallModelCandidate]:
    """Read and validate a candidates file; relative paths inside it are taken from the file's folder."""
    path = Path(path)
    text = read_yaml_file(path, CandidatesFileError)
    return parse_candidates(text, source=str(path), base_dir=path.resolve().parent, env=env)
