"""Tests for schemas/spec.py (the validated job spec) and schemas/load.py (YAML, ${VAR} interpolation, line numbers)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from docroute.schemas.columns import PROVENANCE_COLUMNS
from docroute.schemas.load import JobSpecError, load_job, parse_job
from docroute.schemas.pricing import DEFAULT_PRICES, ModelPrice, UnknownModelPriceError
from docroute.schemas.spec import (
    ClassifySpec,
    ExtractSpec,
    FieldSpec,
    FrontierSpec,
    JobSpec,
    LabelSpec,
    LlamaCppSpec,
    OutputSpec,
    RoutingSpec,
    SourceSpec,
    TaskSpec,
)

# --------------------------------------------------------------------------------------------------------------------
# helpers


def _job(**overrides: Any) -> dict[str, Any]:
    """A minimal valid job as plain data; keyword arguments replace top-level parts."""
    data: dict[str, Any] = {
        "name": "unit-job",
        "source": {"url": "memory://docs"},
        "task": {
            "classify": {"labels": [{"name": "invoice"}, {"name": "receipt"}]},
            "extract": {
                "fields": [
                    {"name": "total", "type": "decimal", "precision": 12, "scale": 2},
                    {"name": "vendor", "type": "str"},
                ]
            },
        },
        "output": {"url": "memory://out"},
    }
    data.update(overrides)
    return data


def _errors(exc: ValidationError) -> str:
    return "\n".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def _field(**options: Any) -> FieldSpec:
    return FieldSpec(**{"name": "x", "type": "str", **options})


# --------------------------------------------------------------------------------------------------------------------
# labels


def test_label_text_defaults_to_name_in_words_and_verbalizer_wins() -> None:
    assert LabelSpec(name="lost_or_stolen_card").text == "lost or stolen card"
    assert LabelSpec(name="pin", verbalizer="PIN blocked").text == "PIN blocked"


def test_duplicate_label_names_are_rejected() -> None:
    with pytest.raises(ValidationError, match="label 'invoice' is listed twice"):
        ClassifySpec(labels=[{"name": "invoice"}, {"name": "receipt"}, {"name": "invoice"}])


def test_labels_that_read_the_same_to_the_model_are_rejected() -> None:
    # "card_arrival" reads "card arrival", the same as the second name
    with pytest.raises(ValidationError, match="distinct verbalizers"):
        ClassifySpec(labels=[{"name": "card_arrival"}, {"name": "card arrival"}])
    # a verbalizer equal to another label's words collides too
    with pytest.raises(ValidationError, match="distinct verbalizers"):
        ClassifySpec(labels=[{"name": "a", "verbalizer": "refund"}, {"name": "refund"}])
    # distinct verbalizers resolve the collision
    spec = ClassifySpec(labels=[{"name": "card_arrival"}, {"name": "card arrival", "verbalizer": "card delivery"}])
    assert [label.text for label in spec.labels] == ["card arrival", "card delivery"]
    assert spec.label_names == ["card_arrival", "card arrival"]


def test_classification_needs_two_labels() -> None:
    with pytest.raises(ValidationError, match="at least 2 items"):
        ClassifySpec(labels=[{"name": "only"}])


# --------------------------------------------------------------------------------------------------------------------
# fields


@pytest.mark.parametrize("name", ["total", "_private", "a", "invoice_date_2", "a" * 63])
def test_valid_field_names(name: str) -> None:
    assert _field(name=name).name == name


@pytest.mark.parametrize("name", ["Total", "2nd_total", "total-amount", "total amount", "", "a" * 64, "tötal"])
def test_field_names_must_be_lowercase_identifiers(name: str) -> None:
    with pytest.raises(ValidationError, match="lowercase identifiers"):
        _field(name=name)


@pytest.mark.parametrize("name", [*PROVENANCE_COLUMNS, "total_confidence", "x_confidence"])
def test_field_names_colliding_with_written_columns_are_rejected(name: str) -> None:
    with pytest.raises(ValidationError, match="collides with a column docroute writes itself"):
        _field(name=name)


def test_duplicate_field_names_are_rejected() -> None:
    with pytest.raises(ValidationError, match="field names listed twice: total"):
        ExtractSpec(fields=[{"name": "total", "type": "decimal"}, {"name": "total", "type": "int"}])


def test_enum_needs_two_distinct_values() -> None:
    with pytest.raises(ValidationError, match="at least two entries"):
        _field(type="enum")
    with pytest.raises(ValidationError, match="at least two entries"):
        _field(type="enum", values=["USD"])
    with pytest.raises(ValidationError, match="enum values must be distinct"):
        _field(type="enum", values=["USD", "USD"])
    assert _field(type="enum", values=["USD", "EUR"]).values == ["USD", "EUR"]


@pytest.mark.parametrize("kind", ["str", "int", "float", "decimal", "date", "datetime", "bool", "list[str]"])
def test_values_are_only_for_enum_fields(kind: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(f"`values` is only for enum fields, not {kind}")):
        _field(type=kind, values=["a", "b"])


def test_decimal_scale_cannot_exceed_precision() -> None:
    with pytest.raises(ValidationError, match="scale cannot exceed its precision"):
        _field(type="decimal", precision=4, scale=6)
    spec = _field(type="decimal", precision=6, scale=6)
    assert (spec.precision, spec.scale) == (6, 6)
    # scale > precision only matters for decimals
    assert _field(type="int", precision=4, scale=6).type == "int"


def test_decimal_precision_and_scale_bounds() -> None:
    with pytest.raises(ValidationError):
        _field(type="decimal", precision=39)
    with pytest.raises(ValidationError):
        _field(type="decimal", precision=0)
    with pytest.raises(ValidationError):
        _field(type="decimal", scale=19)
    assert _field().date_order == "DMY"
    assert _field().required is True


def test_unknown_field_type_is_rejected() -> None:
    with pytest.raises(ValidationError, match=r"type\n  Input should be 'str', 'int', 'float'"):
        _field(type="money")


def test_examples_must_name_known_fields() -> None:
    with pytest.raises(ValidationError, match=r"examples\[1\] names unknown fields: currency, vendor"):
        ExtractSpec(
            fields=[{"name": "total", "type": "decimal"}],
            examples=[
                {"text": "Total 3", "values": {"total": "3"}},
                {"text": "Acme, 4 EUR", "values": {"total": "4", "vendor": "Acme", "currency": "EUR"}},
            ],
        )


def test_extract_field_lookup() -> None:
    spec = ExtractSpec(fields=[{"name": "total", "type": "decimal"}, {"name": "vendor", "type": "str"}])
    assert spec.field("vendor").type == "str"
    with pytest.raises(KeyError):
        spec.field("missing")


def test_task_needs_something_to_do() -> None:
    with pytest.raises(ValidationError, match="needs `classify`, `extract` or both"):
        TaskSpec(instructions="documents")


def test_unknown_keys_are_errors_and_specs_are_frozen() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        SourceSpec(url="memory://docs", globb="*.txt")
    source = SourceSpec(url="memory://docs")
    with pytest.raises(ValidationError, match="frozen"):
        source.glob = "*.txt"


# --------------------------------------------------------------------------------------------------------------------
# job name, routing


@pytest.mark.parametrize("name", ["a", "demo", "demo-invoices-2", "0day", "a" * 63])
def test_valid_job_names(name: str) -> None:
    assert JobSpec.model_validate(_job(name=name)).name == name


@pytest.mark.parametrize("name", ["Demo", "-demo", "demo_x", "demo job", "", "a" * 64, "demo.x"])
def test_job_name_must_be_a_slug(name: str) -> None:
    with pytest.raises(ValidationError, match="job name must be 1-63 lowercase letters"):
        JobSpec.model_validate(_job(name=name))


def test_field_thresholds_must_name_extracted_fields() -> None:
    with pytest.raises(ValidationError, match=r"routing\n.*field_thresholds names unknown fields: totl, vendr"):
        JobSpec.model_validate(_job(routing={"field_thresholds": {"total": 0.5, "totl": 0.5, "vendr": 0.4}}))
    # a classification-only job has no fields to name
    classify_only = _job()
    del classify_only["task"]["extract"]
    classify_only["routing"] = {"field_thresholds": {"total": 0.5}}
    with pytest.raises(ValidationError, match="names unknown fields: total"):
        JobSpec.model_validate(classify_only)


def test_field_threshold_falls_back_to_the_global_threshold() -> None:
    job = JobSpec.model_validate(_job(routing={"threshold": 0.7, "field_thresholds": {"total": 0.9}}))
    assert job.field_threshold("total") == 0.9
    assert job.field_threshold("vendor") == 0.7


def test_routing_thresholds_must_be_probabilities() -> None:
    with pytest.raises(ValidationError, match="threshold for 'total' must be within"):
        RoutingSpec(field_thresholds={"total": 1.01})
    with pytest.raises(ValidationError, match="threshold for 'total' must be within"):
        RoutingSpec(field_thresholds={"total": -0.1})
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        RoutingSpec(threshold=1.5)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        RoutingSpec(max_frontier_usd=-1)
    defaults = RoutingSpec()
    assert (defaults.threshold, defaults.max_frontier_usd, defaults.field_thresholds) == (0.8, 5.0, {})
    assert RoutingSpec(max_frontier_usd=None).max_frontier_usd is None


# --------------------------------------------------------------------------------------------------------------------
# frontier: price and API key


def test_frontier_needs_a_price_for_an_unknown_model() -> None:
    with pytest.raises((UnknownModelPriceError, ValidationError)) as info:
        FrontierSpec(provider="openai", model="gpt-9-turbo")
    assert "gpt-9-turbo" in str(info.value)


def test_frontier_price_override_and_dated_snapshots() -> None:
    price = ModelPrice(input_per_million=1.0, output_per_million=2.0)
    custom = FrontierSpec(provider="openai", model="gpt-9-turbo", price=price)
    assert custom.unit_price == price
    snapshot = FrontierSpec(provider="openai", model="gpt-4o-mini-2024-07-18")
    assert snapshot.unit_price == DEFAULT_PRICES["gpt-4o-mini"]


def test_openai_compatible_frontier_needs_base_url() -> None:
    price = {"input_per_million": 0.1, "output_per_million": 0.2}
    with pytest.raises(ValidationError, match="an openai_compatible frontier needs base_url"):
        FrontierSpec(provider="openai_compatible", model="llama-3-70b", price=price)
    spec = FrontierSpec(provider="openai_compatible", model="llama-3-70b", price=price, base_url="http://gpu:8000/v1")
    assert spec.base_url == "http://gpu:8000/v1"


def test_api_key_comes_from_the_env_in_the_validation_context() -> None:
    env = {"OPENAI_API_KEY": "sk-openai", "ANTHROPIC_API_KEY": "sk-anthropic", "MY_KEY": "sk-custom"}
    openai = FrontierSpec.model_validate({"provider": "openai", "model": "gpt-4o"}, context={"env": env})
    assert openai.api_key is not None
    assert openai.api_key.get_secret_value() == "sk-openai"
    anthropic = FrontierSpec.model_validate(
        {"provider": "anthropic", "model": "claude-haiku-4-5"}, context={"env": env}
    )
    assert anthropic.api_key is not None
    assert anthropic.api_key.get_secret_value() == "sk-anthropic"
    custom = FrontierSpec.model_validate(
        {"provider": "openai", "model": "gpt-4o", "api_key_env": "MY_KEY"}, context={"env": env}
    )
    assert custom.api_key is not None
    assert custom.api_key.get_secret_value() == "sk-custom"
    # an explicit key wins over the environment
    explicit = FrontierSpec.model_validate(
        {"provider": "openai", "model": "gpt-4o", "api_key": "sk-explicit"}, context={"env": env}
    )
    assert explicit.api_key is not None
    assert explicit.api_key.get_secret_value() == "sk-explicit"
    # a named variable that is unset, an empty value, and openai_compatible (no default variable) give no key
    unset = FrontierSpec.model_validate(
        {"provider": "openai", "model": "gpt-4o", "api_key_env": "NOT_SET"}, context={"env": env}
    )
    assert unset.api_key is None
    empty = FrontierSpec.model_validate(
        {"provider": "openai", "model": "gpt-4o"}, context={"env": {"OPENAI_API_KEY": ""}}
    )
    assert empty.api_key is None
    compatible = FrontierSpec.model_validate(
        {
            "provider": "openai_compatible",
            "model": "llama",
            "base_url": "http://gpu:8000/v1",
            "price": {"input_per_million": 0, "output_per_million": 0},
        },
        context={"env": env},
    )
    assert compatible.api_key is None


def test_spec_never_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-process")
    assert FrontierSpec(provider="openai", model="gpt-4o").api_key is None


def test_api_key_is_not_in_repr() -> None:
    spec = FrontierSpec(provider="openai", model="gpt-4o", api_key="sk-very-secret")
    assert "sk-very-secret" not in repr(spec)
    assert "sk-very-secret" not in str(spec.model_dump())


# --------------------------------------------------------------------------------------------------------------------
# paths


def test_relative_local_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    data = _job(
        source={"url": "data/invoices"},
        output={"url": "../out/"},
        small_model={"engine": "llamacpp", "model_path": "models/m.gguf"},
    )
    data["task"]["classify"]["examples_file"] = "examples.csv"
    job = JobSpec.model_validate(data, context={"base_dir": str(tmp_path)})
    assert job.source.url == str(tmp_path / "data" / "invoices")
    assert job.output.url == str(tmp_path.parent / "out")  # resolved, trailing slash removed
    assert job.task.classify is not None
    assert job.task.classify.examples_file == str(tmp_path / "examples.csv")
    assert isinstance(job.small_model, LlamaCppSpec)
    assert job.small_model.model_path == str(tmp_path / "models" / "m.gguf")
    assert job.small_model.model_name == "m.gguf"


def test_remote_and_absolute_paths_are_kept(tmp_path: Path) -> None:
    context = {"base_dir": str(tmp_path)}
    for url in ["s3://bucket/docs", "gs://bucket/docs", "memory://docs", "az:container/docs", "https://x.org/a"]:
        assert SourceSpec.model_validate({"url": url}, context=context).url == url
    assert SourceSpec.model_validate({"url": "/abs/docs"}, context=context).url == "/abs/docs"
    assert OutputSpec.model_validate({"url": "s3://bucket/out/"}, context=context).url == "s3://bucket/out"
    # without a base_dir nothing is resolved
    assert SourceSpec(url="data").url == "data"


def test_defaults() -> None:
    job = JobSpec.model_validate(_job())
    assert isinstance(job.small_model, LlamaCppSpec)
    assert job.small_model.model_name == "gemma-3-270m-q4_k_m.gguf"
    assert job.frontier is None
    assert job.shard_size is None and job.shard_size_for(1000) == 64
    assert job.runner.max_workers == 2
    assert job.source.glob == "**/*"
    assert job.output.compression == "zstd"


# --------------------------------------------------------------------------------------------------------------------
# spec_hash and redaction


def _hash(data: dict[str, Any]) -> str:
    return JobSpec.model_validate(data).spec_hash()


def test_spec_hash_is_stable_and_short() -> None:
    first, second = _hash(_job()), _hash(_job())
    assert first == second
    assert len(first) == 16
    int(first, 16)


def _changed(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(_job())
    target = data
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("task", "instructions"), "Invoices from suppliers."),
        (("task", "classify", "labels"), [{"name": "invoice"}, {"name": "credit_note"}]),
        (("task", "extract", "fields"), [{"name": "total", "type": "decimal", "precision": 12, "scale": 3}]),
        (("small_model",), {"engine": "llamacpp", "n_ctx": 4096}),
        (("small_model",), {"engine": "llamacpp", "few_shot": 8}),
        (("small_model",), {"engine": "openai_compatible", "model": "qwen", "base_url": "http://x/v1"}),
    ],
)
def test_spec_hash_changes_with_task_and_small_model(path: tuple[str, ...], value: Any) -> None:
    assert _hash(_changed(path, value)) != _hash(_job())


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("routing",), {"threshold": 0.3, "field_thresholds": {"total": 0.9}, "max_frontier_usd": 1}),
        (("output",), {"url": "s3://elsewhere/out", "compression": "snappy"}),
        (("small_model",), {"engine": "llamacpp", "n_threads": 3}),
        (("small_model",), {"engine": "llamacpp", "usd_per_hour": 0.4}),
        (("name",), "another-job"),
        (("shard_size",), 7),
        (("runner",), {"max_workers": 9}),
        (("source",), {"url": "memory://other"}),
        (("source",), {"url": "memory://docs", "change_detection": "content"}),
        (("frontier",), {"provider": "openai", "model": "gpt-4o"}),
    ],
)
def test_spec_hash_ignores_routing_output_and_runtime_knobs(path: tuple[str, ...], value: Any) -> None:
    assert _hash(_changed(path, value)) == _hash(_job())


def test_spec_hash_of_an_existing_job_is_unchanged_by_newer_options() -> None:
    """Pinned: an option added with its default must not change the hash, or every existing output reprocesses.

    The value is this job's hash before source.change_detection existed; change it only on purpose.
    """
    assert _hash(_job()) == "1f8d8a8ffe6a4d1d"
    assert _hash(_job(source={"url": "memory://docs", "change_detection": "content"})) == "1f8d8a8ffe6a4d1d"


def test_change_detection_is_metadata_or_content() -> None:
    assert JobSpec.model_validate(_job()).source.change_detection == "metadata"
    with pytest.raises(ValidationError, match="change_detection"):
        JobSpec.model_validate(_job(source={"url": "memory://docs", "change_detection": "hash"}))


def test_spec_hash_ignores_transport_knobs_of_a_served_small_model() -> None:
    base = {"engine": "openai_compatible", "model": "qwen", "base_url": "http://x/v1"}
    tuned = {**base, "max_concurrency": 64, "timeout_s": 5, "max_retries": 0, "usd_per_hour": 2.5}
    assert _hash(_job(small_model=base)) == _hash(_job(small_model=tuned))


def test_redacted_masks_secrets_and_storage_options() -> None:
    data = _job(
        source={"url": "s3://bucket/docs", "storage_options": {"key": "AKIA-SOURCE", "secret": "src-secret"}},
        output={"url": "s3://bucket/out", "storage_options": {"token": "out-token"}},
        small_model={"engine": "openai_compatible", "model": "qwen", "base_url": "http://x/v1", "api_key": "sm-key"},
        frontier={"provider": "openai", "model": "gpt-4o", "api_key": "fr-key"},
    )
    job = JobSpec.model_validate(data)
    redacted = job.redacted()
    assert redacted["source"]["storage_options"] == {"key": "***", "secret": "***"}
    assert redacted["output"]["storage_options"] == {"token": "***"}
    assert redacted["frontier"]["api_key"] == "***"
    assert redacted["small_model"]["api_key"] == "***"
    dumped = json.dumps(redacted)
    for secret in ["AKIA-SOURCE", "src-secret", "out-token", "sm-key", "fr-key"]:
        assert secret not in dumped
    # the rest is kept for the logs
    assert redacted["name"] == "unit-job"
    assert redacted["frontier"]["model"] == "gpt-4o"
    assert redacted["source"]["url"] == "s3://bucket/docs"
    # the spec itself still holds the real values
    assert job.source.storage_options["key"] == "AKIA-SOURCE"
    assert isinstance(job.frontier.api_key if job.frontier else None, SecretStr)


def test_redacted_without_frontier_or_key() -> None:
    redacted = JobSpec.model_validate(_job(frontier={"provider": "openai", "model": "gpt-4o"})).redacted()
    assert redacted["frontier"]["api_key"] is None
    assert JobSpec.model_validate(_job()).redacted()["frontier"] is None


# --------------------------------------------------------------------------------------------------------------------
# load.py: YAML text to JobSpec

_CLASSIFY_YAML = """\
name: demo
source:
  url: docs
task:
  classify:
    labels: [{name: a}, {name: b}]
routing:
  max_frontier_usd: 1
  threshold: 1.5
output:
  url: out
"""


def _problems(text: str, **kwargs: Any) -> list[str]:
    with pytest.raises(JobSpecError) as info:
        parse_job(text, env=kwargs.pop("env", {}), **kwargs)
    return info.value.problems


def test_parse_job_valid_document(tmp_path: Path) -> None:
    job = parse_job(_CLASSIFY_YAML.replace("1.5", "0.5"), base_dir=tmp_path, env={})
    assert job.name == "demo"
    assert job.routing.threshold == 0.5
    assert job.routing.max_frontier_usd == 1.0
    assert job.source.url == str(tmp_path / "docs")
    assert job.output.url == str(tmp_path / "out")


def test_bad_threshold_reports_its_line() -> None:
    problems = _problems(_CLASSIFY_YAML, source="job.yaml")
    assert problems == ["line 9: routing.threshold: Input should be less than or equal to 1"]


def test_error_message_names_the_source_and_lists_problems() -> None:
    with pytest.raises(JobSpecError) as info:
        parse_job(_CLASSIFY_YAML, source="jobs/demo.yaml", env={})
    assert str(info.value) == (
        "invalid job spec jobs/demo.yaml:\n  - line 9: routing.threshold: Input should be less than or equal to 1"
    )
    assert info.value.source == "jobs/demo.yaml"
    assert isinstance(info.value, ValueError)


def test_every_problem_is_listed_with_its_line() -> None:
    text = """\
name: demo
source:
  url: docs
task:
  extract:
    fields:
      - name: total
        type: decimal
      - name: Bad
        type: str
      - name: cur
        type: enum
        values: [USD]
output:
  url: out
"""
    assert _problems(text) == [
        "line 9: task.extract.fields.1.name: field names must be lowercase identifiers (a-z, 0-9, _; not starting "
        "with a digit), so every warehouse can query the column unquoted",
        "line 11: task.extract.fields.2: an enum field needs `values` with at least two entries",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "name: demo\nsource:\n  url: docs\n  glob: '*.txt'\n  formt: pdf\n"
            "task:\n  classify:\n    labels: [{name: a}, {name: b}]\noutput:\n  url: out\n",
            "line 5: source.formt: Extra inputs are not permitted",
        ),
        (
            "name: demo\nsource:\n  url: docs\ntask:\n  classify:\n    labels: [{name: a}, {name: b}]\n"
            "small_model:\n  engine: llamacpp\n  n_ctx: 10\noutput:\n  url: out\n",
            "line 9: small_model.n_ctx: Input should be greater than or equal to 256",
        ),
        (
            "name: demo\nsource:\n  url: docs\ntask:\n  classify:\n    labels: [{name: a}, {name: b}]\n"
            "small_model:\n  engine: openai_compatible\n  model: m\n  base_url: http://x\n  max_concurrency: 0\n"
            "output:\n  url: out\n",
            "line 11: small_model.max_concurrency: Input should be greater than or equal to 1",
        ),
        (
            "name: demo\nsource:\n  url: docs\ntask:\n  extract:\n    fields:\n      - {name: total, type: decimal}\n"
            "routing:\n  field_thresholds:\n    total: 1.5\noutput:\n  url: out\n",
            "line 10: routing.field_thresholds: threshold for 'total' must be within [0, 1]",
        ),
        (
            "name: demo\nsource:\n  url: docs\ntask:\n  classify:\n    labels: [{name: a}, {name: b}]\n"
            "output:\n  url: out\nfrontier:\n  provider: openai_compatible\n  model: llama\n"
            "  price: {input_per_million: 1, output_per_million: 2}\n",
            "line 10: frontier: an openai_compatible frontier needs base_url",
        ),
        (
            "name: demo\nsource:\n  url: docs\ntask:\n  instructions: hi\noutput:\n  url: out\n",
            "line 5: task: a task needs `classify`, `extract` or both",
        ),
        (
            "name: Demo_Job\nsource:\n  url: docs\ntask:\n  classify:\n    labels: [{name: a}, {name: b}]\n"
            "output:\n  url: out\n",
            "line 1: name: job name must be 1-63 lowercase letters, digits or dashes, starting alphanumeric",
        ),
        (
            "name: demo\nsource:\n  url: docs\ntask:\n  classify:\n    labels:\n      - name: a\n      - name: a\n"
            "output:\n  url: out\n",
            "line 7: task.classify.labels: label 'a' is listed twice",
        ),
        (
            "name: demo\nsource:\n  url: docs\ntask:\n  classify:\n    labels: [{name: a}, {name: b}]\n",
            "line 1: output: Field required",
        ),
    ],
    ids=[
        "typo",
        "n_ctx",
        "served-small-model",
        "field-threshold",
        "base-url",
        "no-task",
        "job-name",
        "dup-label",
        "missing-output",
    ],
)
def test_validation_errors_point_at_their_line(text: str, expected: str) -> None:
    assert _problems(text) == [expected]


def test_unknown_field_threshold_points_at_the_routing_lines() -> None:
    text = """\
name: demo
source:
  url: docs
task:
  extract:
    fields:
      - {name: total, type: decimal}
routing:
  field_thresholds:
    totl: 0.5
output:
  url: out
"""
    (problem,) = _problems(text)
    assert "totl" in problem
    assert problem.startswith(("line 9:", "line 10:")), problem


def test_unknown_frontier_model_is_a_job_spec_error() -> None:
    text = """\
name: demo
source:
  url: docs
task:
  classify:
    labels: [{name: a}, {name: b}]
output:
  url: out
frontier:
  provider: openai
  model: gpt-9-turbo
"""
    problems = _problems(text)
    assert any("gpt-9-turbo" in p for p in problems)


def test_unknown_frontier_model_error_names_the_model() -> None:
    text = "name: demo\nsource: {url: docs}\ntask: {classify: {labels: [{name: a}, {name: b}]}}\noutput: {url: out}\n"
    text += "frontier: {provider: openai, model: gpt-9-turbo}\n"
    with pytest.raises((JobSpecError, UnknownModelPriceError)) as info:
        parse_job(text, env={})
    assert "gpt-9-turbo" in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: [a\n  b: c\n", "line 2: not valid YAML: expected ',' or ']', but got ':'"),
        ("name: x\n  bad: indent\n", "line 2: not valid YAML: mapping values are not allowed here"),
    ],
)
def test_yaml_syntax_errors_have_line_numbers(text: str, expected: str) -> None:
    assert _problems(text) == [expected]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    assert _problems(text) == ["the job file must be a YAML mapping (key: value) at the top level"]


_ENV_YAML = """\
name: ${JOB:-demo}
source:
  url: ${SRC}
  glob: "${GLOB:-*.txt}"
  storage_options: {key: "${AK}", region: "${REGION:-}"}
task:
  classify:
    labels: [{name: "${L1}"}, {name: b}]
output:
  url: s3://bucket/${PREFIX}/${RUN:-latest}
shard_size: ${SHARD:-16}
"""


def test_env_interpolation_with_defaults() -> None:
    env = {"SRC": "s3://in", "AK": "AKIA", "L1": "alpha", "PREFIX": "p", "GLOB": "**/*.pdf"}
    job = parse_job(_ENV_YAML, env=env)
    assert job.name == "demo"  # default used
    assert job.source.url == "s3://in"
    assert job.source.glob == "**/*.pdf"  # set value wins over default
    assert job.source.storage_options == {"key": "AKIA", "region": ""}  # empty default
    assert job.task.classify is not None
    assert job.task.classify.label_names == ["alpha", "b"]  # inside lists
    assert job.output.url == "s3://bucket/p/latest"  # several references in one string
    assert job.shard_size == 16  # interpolated text still validates as an int


def test_missing_env_variables_are_all_reported() -> None:
    assert _problems(_ENV_YAML, env={"SRC": "s3://in"}) == [
        "environment variable ${AK} is not set",
        "environment variable ${L1} is not set",
        "environment variable ${PREFIX} is not set",
    ]


def test_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"SRC": "s3://from-process", "AK": "k", "L1": "x", "PREFIX": "p"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("JOB", raising=False)
    assert parse_job(_ENV_YAML).source.url == "s3://from-process"
    # an explicit env replaces the process environment entirely
    assert _problems(_ENV_YAML, env={"SRC": "s3://x"})[0] == "environment variable ${AK} is not set"


def test_frontier_key_comes_from_the_explicit_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-process")
    text = _CLASSIFY_YAML.replace("1.5", "0.5") + "frontier:\n  provider: openai\n  model: gpt-4o-mini\n"
    with_key = parse_job(text, env={"OPENAI_API_KEY": "sk-explicit"})
    assert with_key.frontier is not None
    assert with_key.frontier.api_key is not None
    assert with_key.frontier.api_key.get_secret_value() == "sk-explicit"
    without = parse_job(text, env={})
    assert without.frontier is not None
    assert without.frontier.api_key is None
    from_process = parse_job(text)
    assert from_process.frontier is not None
    assert from_process.frontier.api_key is not None
    assert from_process.frontier.api_key.get_secret_value() == "sk-process"


def test_load_job_resolves_paths_against_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    path = folder / "job.yaml"
    path.write_text(_CLASSIFY_YAML.replace("1.5", "0.5"), encoding="utf-8")
    job = load_job(path, env={})
    assert job.source.url == str(folder / "docs")
    assert job.output.url == str(folder / "out")


def test_load_job_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(_CLASSIFY_YAML, encoding="utf-8")
    with pytest.raises(JobSpecError) as info:
        load_job(path, env={})
    assert info.value.source == str(path)
    assert info.value.problems == ["line 9: routing.threshold: Input should be less than or equal to 1"]


def test_load_job_missing_file(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError) as info:
        load_job(tmp_path / "nope.yaml", env={})
    assert info.value.problems == ["the job file does not exist"]


def test_load_job_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(JobSpecError) as info:
        load_job(path, env={})
    assert info.value.problems == ["the job file is not UTF-8 text (invalid continuation byte)"]


def test_s3_settings_become_s3fs_options_and_stay_secret() -> None:
    from docroute.schemas.spec import OutputSpec, SourceSpec

    source = SourceSpec(
        url="s3://bucket/in",
        s3={"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1", "key": "AKIA1", "secret": "s3cr3t"},
        storage_options={"client_kwargs": {"verify": False}, "default_block_size": 1024},
    )
    assert source.fsspec_options() == {
        "key": "AKIA1",
        "secret": "s3cr3t",
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"verify": False, "region_name": "eu-west-1"},
        "default_block_size": 1024,
    }
    assert "s3cr3t" not in repr(source) and "AKIA1" not in repr(source)
    assert OutputSpec(url="s3://b/out", s3={"profile": "etl"}).fsspec_options() == {"profile": "etl"}
    assert OutputSpec(url="s3://b/out").fsspec_options() == {}  # the AWS chain decides
    with pytest.raises(ValueError, match="go together"):
        SourceSpec(url="s3://bucket/in", s3={"key": "AKIA1"})
    with pytest.raises(ValueError, match="s3:// URLs only"):
        SourceSpec(url="gs://bucket/in", s3={"region": "eu-west-1"})


def test_redacted_masks_s3_credentials() -> None:
    job = JobSpec(
        name="s3",
        source={"url": "s3://bucket/docs", "s3": {"key": "AKIA-SRC", "secret": "src-secret", "token": "tok"}},
        task={"classify": {"labels": [{"name": "a"}, {"name": "b"}]}},
        output={"url": "s3://bucket/out"},
    )
    text = json.dumps(job.redacted())
    assert "src-secret" not in text and "AKIA-SRC" not in text and 'tok"' not in text


def test_shards_are_sized_to_the_run_unless_the_job_says() -> None:
    def job(**extra: object) -> JobSpec:
        return JobSpec.model_validate(
            {
                "name": "t",
                "source": {"url": "memory://docs"},
                "output": {"url": "memory://out"},
                "task": {"classify": {"labels": [{"name": "a"}, {"name": "b"}]}},
                **extra,
            }
        )

    default = job()
    assert default.shard_size is None and "shard_size" not in default.model_dump(exclude_none=True)
    assert default.shard_size_for(10) == 64  # small runs: never under 64 documents
    assert default.shard_size_for(10_000) == 313  # 16 shards per worker, 2 workers
    assert default.shard_size_for(100_000) == 2048  # large runs: the task overhead stays bounded
    assert job(runner={"max_workers": 8}).shard_size_for(100_000) == 782
    assert job(shard_size=16).shard_size_for(100_000) == 16
    assert default.spec_hash() == job(shard_size=16).spec_hash()  # how work is cut never changes answers
