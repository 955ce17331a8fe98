"""Load a job spec from YAML with errors that name the bad field and its line.

This is the one place that reads environment variables: `${NAME}` / `${NAME:-default}` in YAML strings and the
frontier API key default are resolved here and nowhere else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from docroute.schemas.errors import InputError
from docroute.schemas.spec import JobSpec

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


ENGINE_TAGS = frozenset({"llamacpp", "vllm", "openai_compatible"})
"""pydantic's discriminator tags in error locations: not keys the user wrote, so never shown."""

ModelT = TypeVar("ModelT", bound=BaseModel)


class YamlFileError(InputError, ValueError):
    """A YAML file that cannot be used; the message lists every problem with its line, so one pass fixes them all."""

    heading: ClassVar[str] = "invalid YAML file"
    what: ClassVar[str] = "YAML file"

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{self.heading} {source}:\n" + "\n".join(f"  - {p}" for p in problems))


class JobSpecError(YamlFileError):
    """A job file that cannot be used."""

    heading = "invalid job spec"
    what = "job file"


def _interpolate(value: Any, env: Mapping[str, str], where: list[str]) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            where.append(name)
            return match.group(0)

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, list):
        return [_interpolate(v, env, where) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env, where) for k, v in value.items()}
    return value


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """Walk the composed YAML tree along a pydantic error location; return the deepest line found (1-based)."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                    child = value_node
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            child = node.value[part]
        if child is None:
            break
        node = child
        line = node.start_mark.line + 1
    return line


def _dotted(_data: Any, loc: tuple[int | str, ...]) -> str:
    """`small_model.model_path`: a location as the keys the user wrote."""
    return ".".join(str(p) for p in loc) or "(top level)"


def validate_yaml(
    text: str,
    model: type[ModelT],
    error: type[YamlFileError],
    *,
    source: str,
    base_dir: str | Path | None,
    env: Mapping[str, str] | None,
    shape_problem: Callable[[Any], str | None],
    where: Callable[[Any, tuple[int | str, ...]], str] = _dotted,
) -> ModelT:
    """Parse YAML text, resolve `${NAME}` references, and validate it as `model`, raising `error` with every problem
    and its line. `shape_problem` says what is wrong with the top level before validation (None when fine); `where`
    names an error's location for a person; `env` defaults to the process environment."""
    env = dict(os.environ) if env is None else dict(env)
    try:
        tree = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        raise error(source, [f"{at}not valid YAML: {getattr(exc, 'problem', exc)}"]) from exc
    if (problem := shape_problem(data)) is not None:
        raise error(source, [problem])
    missing: list[str] = []
    data = _interpolate(data, env, missing)
    if missing:
        raise error(source, [f"environment variable ${{{name}}} is not set" for name in sorted(set(missing))])
    context = {"base_dir": str(base_dir) if base_dir is not None else None, "env": env}
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        problems = []
        for item in exc.errors(include_url=False):
            loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p in ENGINE_TAGS))
            line = _line_of(tree, loc)
            prefix = f"line {line}: " if line is not None else ""
            problems.append(f"{prefix}{where(data, loc)}: {item['msg'].removeprefix('Value error, ')}")
        raise error(source, problems) from None


def read_yaml_file(path: Path, error: type[YamlFileError]) -> str:
    """The file's text, or `error` saying in one line why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(str(path), [f"the {error.what} does not exist"]) from None
    except UnicodeDecodeError as exc:
        raise error(str(path), [f"the {error.what} is not UTF-8 text ({exc.reason})"]) from None


def _job_shape(data: Any) -> str | None:
    return None if isinstance(data, dict) else "the job file must be a YAML mapping (key: value) at the top level"


def parse_job(
    text: str,
    *,
    source: str = "<job>",
    base_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> JobSpec:
    """Validate YAML text as a JobSpec; `env` defaults to the process environment."""
    return validate_yaml(
        text, JobSpec, JobSpecError, source=source, base_dir=base_dir, env=env, shape_problem=_job_shape
    )


def load_job(path: str | Path, *, env: Mapping[str, str] | None = None) -> JobSpec:
    """Read and validate a job file; relative paths inside it are taken from the file's folder."""
    path = Path(path)
    text = read_yaml_file(path, JobSpecError)
    return parse_job(text, source=str(path), base_dir=path.resolve().parent, env=env)


def with_output(spec: JobSpec, output: str | None) -> JobSpec:
    """The spec writing to `output` instead of its output.url (`--output`); a local path is made absolute, so
    every worker of the run names the same folder."""
    if not output:
        return spec
    url = output if "://" in output else str(Path(output).expanduser().resolve())
    return spec.model_copy(update={"output": spec.output.model_copy(update={"url": url.rstrip("/")})})
