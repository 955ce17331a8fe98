"""The job spec: one validated pydantic model describing a docroute job, loaded from YAML.

Everything a run needs — where documents come from, what to classify or extract, which engines to use, how to
route and where to write — is validated here once, so the rest of the code receives typed objects and never
re-checks configuration or reads the environment itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from docroute.schemas.columns import CONFIDENCE_SUFFIX, PROVENANCE_COLUMNS
from docroute.schemas.layout import OutputLayout
from docroute.schemas.pricing import (
    ModelPrice,
    UnknownModelPriceError,
    encoder_cost_usd,
    lookup_price,
    self_hosted_cost_usd,
)

FieldType = Literal["str", "int", "float", "decimal", "date", "datetime", "bool", "enum", "list[str]"]
DocFormat = Literal["auto", "txt", "md", "html", "pdf", "docx", "eml", "json", "jsonl", "image"]

AUTO_SHARD_MIN, AUTO_SHARD_MAX = 64, 2048
"""Bounds of the shard size chosen when a job sets none (JobSpec.shard_size_for)."""

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_JOB_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class StrictModel(BaseModel):
    """Base for every spec part: unknown keys are errors (a typo must not silently use a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _is_local_path(url: str) -> bool:
    return "://" not in url and not url.startswith(("s3:", "gs:", "gcs:", "az:", "abfs:", "memory:"))


def _resolve_path(url: str, info: ValidationInfo) -> str:
    """Make a local path relative to the job file absolute, so a job runs the same from any working directory."""
    base = (info.context or {}).get("base_dir")
    if base is None or not _is_local_path(url):
        return url
    from pathlib import Path

    path = Path(url).expanduser()
    return str(path if path.is_absolute() else (Path(base) / path).resolve())


class S3Spec(StrictModel):
    """S3 (or any S3-compatible store: MinIO, R2, Ceph) access for an s3:// URL.

    Every field is optional: what is left out comes from the standard AWS chain (environment, shared config and
    credentials files, instance or pod role), as boto does. Secrets are SecretStr so they never print, and they are
    handed to s3fs only when a filesystem is opened.
    """

    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint, e.g. http://minio:9000")
    region: str | None = Field(default=None, description="AWS region of the bucket")
    profile: str | None = Field(default=None, description="a profile of the shared AWS config")
    anon: bool = Field(default=False, description="unsigned requests (public buckets)")
    key: SecretStr | None = Field(default=None, repr=False, description="access key id")
    secret: SecretStr | None = Field(default=None, repr=False, description="secret access key")
    token: SecretStr | None = Field(default=None, repr=False, description="session token")

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.key is None) != (self.secret is None):
            raise ValueError("s3.key and s3.secret go together: give both, or neither to use the AWS chain")
        return self

    def fsspec_options(self) -> dict[str, Any]:
        """The s3fs keyword arguments these settings mean."""
        options: dict[str, Any] = {}
        if self.anon:
            options["anon"] = True
        if self.profile:
            options["profile"] = self.profile
        if self.key is not None and self.secret is not None:
            options["key"], options["secret"] = self.key.get_secret_value(), self.secret.get_secret_value()
        if self.token is not None:
            options["token"] = self.token.get_secret_value()
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if self.region:
            options["client_kwargs"] = {"region_name": self.region}
        return options


class StorageAccess(StrictModel):
    """How to open a location's filesystem: typed S3 settings, and raw fsspec options for anything else."""

    s3: S3Spec | None = Field(default=None, description="s3:// access: endpoint, region, credentials")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, repr=False, description="extra fsspec keyword arguments for the URL's filesystem"
    )

    @model_validator(mode="after")
    def _s3_only_for_s3(self) -> Self:
        url = getattr(self, "url", "")
        if self.s3 is not None and not url.startswith(("s3://", "s3a://")):
            raise ValueError(f"s3 settings apply to s3:// URLs only, not {url!r}; use storage_options")
        return self

    def fsspec_options(self) -> dict[str, Any]:
        """Keyword arguments for fsspec: storage_options, then the typed S3 settings (which win)."""
        options = dict(self.storage_options)
        if self.s3 is not None:
            typed = self.s3.fsspec_options()
            client_kwargs = {**options.get("client_kwargs", {}), **typed.pop("client_kwargs", {})}
            options.update(typed)
            if client_kwargs:
                options["client_kwargs"] = client_kwargs
        return options


class SourceSpec(StorageAccess):
    """Where the documents are and how to read them."""

    url: str = Field(min_length=1, description="fsspec URL or local folder; local paths are relative to the job file")
    glob: str = Field(default="**/*", min_length=1, description="pattern under url selecting the documents")
    format: DocFormat = Field(default="auto", description="auto picks the parser from the file extension")
    text_field: str = Field(default="text", min_length=1, description="json/jsonl: dotted path of the text")
    id_field: str | None = Field(default=None, description="json/jsonl: dotted path of a stable record key")
    max_bytes: int = Field(default=20 * 1024 * 1024, gt=0, description="larger files become error rows")
    encoding: str | None = Field(default=None, description="force a text encoding instead of detecting it")
    max_pages: int = Field(
        default=50,
        ge=1,
        le=2000,
        description=(
            "the most pages of one document that OCR reads (an image's pages; a PDF's pages without a usable text "
            "layer): a document needing more becomes a too_many_pages error row, so one 500-page scan cannot hold a "
            "shard for an hour; text-layer pages are not counted"
        ),
    )
    max_ocr_seconds: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description=(
            "the most seconds OCR spends on one document: once spent, its remaining pages are not read; a document "
            "with some text keeps the pages read (ocr_unread_pages says how many were not), one with none becomes "
            "an ocr_time_limit error row. Checked between pages, so one page's OCR is never cut short"
        ),
    )
    ocr_threads: int = Field(
        default=1,
        ge=1,
        le=256,
        description=(
            "threads each OCR model computes one page with; the shards in flight (runner.max_workers) are what read "
            "pages in parallel, so 1 suits a machine whose cores they fill; raise it when cores outnumber shards"
        ),
    )
    change_detection: Literal["metadata", "content"] = Field(
        default="metadata",
        description=(
            "how a run tells a changed file: metadata trusts the listing (an object store's content ETag, else "
            "modification time and size); content also hashes, on every run, the bytes of each file whose listing "
            "has no content ETag (local folders, SFTP…), so an edit that keeps size and mtime is seen too"
        ),
    )

    @field_validator("url")
    @classmethod
    def _resolve(cls, url: str, info: ValidationInfo) -> str:
        return _resolve_path(url, info)


class LabelSpec(StrictModel):
    """One class of a classification task."""

    name: str = Field(min_length=1, max_length=200)
    description: str = ""
    examples: list[str] = Field(default_factory=list)
    verbalizer: str | None = Field(
        default=None,
        description="text the label-scoring model reads for this label; default: the name in words",
    )

    @property
    def text(self) -> str:
        """Return the words a language model scores for this label."""
        return self.verbalizer or self.name.replace("_", " ").strip()


class ClassifySpec(StrictModel):
    """Assign exactly one label to each document."""

    labels: list[LabelSpec] = Field(min_length=2)
    examples_file: str | None = Field(
        default=None,
        description="CSV or JSONL of labeled examples (columns text,label), relative to the job file",
    )
    instructions: str = ""

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[LabelSpec]) -> list[LabelSpec]:
        seen: set[str] = set()
        for label in labels:
            if label.name in seen:
                raise ValueError(f"label {label.name!r} is listed twice")
            seen.add(label.name)
        texts = [label.text for label in labels]
        if len(set(texts)) != len(texts):
            raise ValueError("two labels read the same to the model; give them distinct verbalizers")
        return labels

    @field_validator("examples_file")
    @classmethod
    def _resolve(cls, path: str | None, info: ValidationInfo) -> str | None:
        return None if path is None else _resolve_path(path, info)

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]


class FieldSpec(StrictModel):
    """One field to extract, with the type its Parquet column will have."""

    name: str
    type: FieldType
    description: str = ""
    required: bool = True
    values: list[str] | None = Field(default=None, description="enum only: the allowed values")
    precision: int = Field(default=18, ge=1, le=38, description="decimal only")
    scale: int = Field(default=2, ge=0, le=18, description="decimal only")
    date_order: Literal["DMY", "MDY", "YMD"] = Field(
        default="DMY", description="how to read ambiguous dates such as 03/04/2024"
    )

    @field_validator("name")
    @classmethod
    def _identifier(cls, name: str) -> str:
        if not _IDENTIFIER.match(name):
            raise ValueError(
                "field names must be lowercase identifiers (a-z, 0-9, _; not starting with a digit), "
                "so every warehouse can query the column unquoted"
            )
        if name in PROVENANCE_COLUMNS or name.endswith(CONFIDENCE_SUFFIX):
            raise ValueError(f"field name {name!r} collides with a column docroute writes itself")
        return name

    @model_validator(mode="after")
    def _type_options(self) -> Self:
        if self.type == "enum":
            if not self.values or len(self.values) < 2:
                raise ValueError("an enum field needs `values` with at least two entries")
            if len(set(self.values)) != len(self.values):
                raise ValueError("enum values must be distinct")
        elif self.values is not None:
            raise ValueError(f"`values` is only for enum fields, not {self.type}")
        if self.type == "decimal" and self.scale > self.precision:
            raise ValueError("decimal scale cannot exceed its precision")
        return self


class ExtractExample(StrictModel):
    """A worked example for extraction: a document and the values a careful reader takes from it."""

    text: str = Field(min_length=1)
    values: dict[str, Any]


class ExtractSpec(StrictModel):
    """Fill typed fields from each document."""

    fields: list[FieldSpec] = Field(min_length=1)
    examples: list[ExtractExample] = Field(default_factory=list)
    examples_file: str | None = Field(
        default=None,
        exclude_if=lambda path: path is None,  # jobs without one keep their spec hash
        description="JSONL ({text, values}) or CSV/Parquet (a text column and one column per field) of worked "
        "examples, relative to the job file: what the candidate ranker learns from (the inline examples are "
        "also the prompt's)",
    )
    instructions: str = ""

    @field_validator("examples_file")
    @classmethod
    def _resolve(cls, path: str | None, info: ValidationInfo) -> str | None:
        return None if path is None else _resolve_path(path, info)

    @field_validator("fields")
    @classmethod
    def _unique_fields(cls, fields: list[FieldSpec]) -> list[FieldSpec]:
        names = [f.name for f in fields]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"field names listed twice: {', '.join(duplicates)}")
        return fields

    @model_validator(mode="after")
    def _examples_name_fields(self) -> Self:
        known = {f.name for f in self.fields}
        for i, example in enumerate(self.examples):
            unknown = sorted(set(example.values) - known)
            if unknown:
                raise ValueError(f"examples[{i}] names unknown fields: {', '.join(unknown)}")
        return self

    def field(self, name: str) -> FieldSpec:
        for spec in self.fields:
            if spec.name == name:
                return spec
        raise KeyError(name)


class TaskSpec(StrictModel):
    """What to do with each document: classify, extract, or both."""

    instructions: str = Field(default="", description="context shared by every prompt, e.g. what the documents are")
    classify: ClassifySpec | None = None
    extract: ExtractSpec | None = None

    @model_validator(mode="after")
    def _something_to_do(self) -> Self:
        if self.classify is None and self.extract is None:
            raise ValueError("a task needs `classify`, `extract` or both")
        return self


ClassifyStrategy = Literal["auto", "label_scoring", "embedding_head", "similarity"]
"""How the small model classifies. label_scoring: the generative model's likelihood of each label (llama.cpp,
vLLM) or its JSON answer (a served model); embedding_head: a logistic-regression head over an encoder's vectors,
trained on the job's labeled examples; similarity: zero-shot, cosine between a document's vector and each label's
description (and any examples); auto: chosen by cross-validation on the job's own examples."""


class VllmEncoderSpec(StrictModel):
    """An embedding model under vLLM's pooling runner (`LLM(model, runner="pooling")`, `LLM.embed`), on a GPU."""

    kind: Literal["vllm"] = "vllm"
    model: str = Field(min_length=1, description="Hugging Face id or local path of an embedding model")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int | None = Field(default=None, ge=32)
    gpu_memory_utilization: float = Field(
        default=0.2, gt=0, le=1, description="share of the GPU it may take (it sits beside a generative model)"
    )
    max_input_tokens: int = Field(default=512, ge=8, description="tokens read per text; the rest is truncated")

    @property
    def name(self) -> str:
        return f"vllm:{self.model}"


class OpenAICompatibleEncoderSpec(StrictModel):
    """An embeddings endpoint (`POST /v1/embeddings`): OpenAI, `vllm serve`, llama.cpp's server, any compatible one."""

    kind: Literal["openai_compatible"] = "openai_compatible"
    model: str = Field(min_length=1)
    base_url: str | None = Field(default=None, description="default: OpenAI's API")
    api_key: SecretStr | None = Field(default=None, repr=False)
    api_key_env: str | None = Field(
        default=None, description="environment variable holding the key; default OPENAI_API_KEY without base_url"
    )
    dimensions: int | None = Field(default=None, ge=1, description="shortened vectors, where the model supports it")
    price: ModelPrice | None = Field(
        default=None,
        description="USD per 1M input tokens; default from the price table, and 0 for a self-hosted base_url",
    )
    batch_size: int = Field(default=128, ge=1, le=2048, description="texts per request")
    max_concurrency: int = Field(default=4, ge=1, le=64)
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=4, ge=0, le=20)
    max_input_tokens: int = Field(default=512, ge=8, description="tokens read per text; the rest is truncated")

    @model_validator(mode="after")
    def _key_and_price(self, info: ValidationInfo) -> Self:
        if self.base_url is None:
            try:
                lookup_price(self.model, self.price)  # OpenAI's own API costs money: never a silent $0
            except UnknownModelPriceError as exc:
                raise ValueError(str(exc)) from None
        if self.api_key is None:
            env = (info.context or {}).get("env") or {}
            name = self.api_key_env or (None if self.base_url else "OPENAI_API_KEY")
            if name and env.get(name):
                object.__setattr__(self, "api_key", SecretStr(env[name]))
        return self

    @property
    def name(self) -> str:
        return f"openai_compatible:{self.model}" + (f"@{self.dimensions}" if self.dimensions else "")

    @property
    def unit_price(self) -> ModelPrice:
        """What a token costs: the given price, the table's for OpenAI's API, nothing for a self-hosted server."""
        if self.price is not None or self.base_url is None:
            return lookup_price(self.model, self.price)
        return ModelPrice(input_per_million=0.0, output_per_million=0.0)


EncoderSpec = (
    Literal["llamacpp", "wordllama"]
    | Annotated[VllmEncoderSpec | OpenAICompatibleEncoderSpec, Field(discriminator="kind")]
)
"""The vectors an embedding head or similarity reads. llamacpp: the GGUF model's mean-pooled embeddings;
wordllama: the 16 MB static encoder bundled in the wordllama wheel (fast, strong on short texts); or an embedding
model under vLLM or behind an embeddings endpoint."""

_ENCODER_DESCRIPTION = (
    "embedding head and similarity: the vectors they read (llamacpp, wordllama, {kind: vllm, ...} or "
    "{kind: openai_compatible, ...}); default: chosen with classify_strategy auto, else wordllama"
)


def _encoder_unset(encoder: object) -> bool:
    return encoder is None


class _SmallModelParts(StrictModel):
    """What every small model has beside its generative engine: how it classifies and extracts without it.

    Each default is left out of dumps: `spec_hash` hashes the dump, and adding these options must not change an
    existing job's hash (that would reprocess all its documents).
    """

    classify_strategy: ClassifyStrategy = Field(
        default="label_scoring",
        exclude_if=lambda strategy: strategy == "label_scoring",
        description="label_scoring: the model itself answers; embedding_head, similarity or auto as for llamacpp",
    )
    encoder: EncoderSpec | None = Field(default=None, exclude_if=_encoder_unset, description=_ENCODER_DESCRIPTION)
    extract_ranker: Literal["auto", "never"] = Field(
        default="auto",
        exclude_if=lambda choice: choice == "auto",
        description="auto: learned candidate rankers answer the fields when the job has 20+ worked examples "
        "(extract.examples + examples_file) or docroute train promoted them; never: the model always answers",
    )


class LlamaCppSpec(_SmallModelParts):
    """Embedded CPU engine: llama.cpp with a local GGUF (default: the packaged Gemma 3 270M)."""

    engine: Literal["llamacpp"] = "llamacpp"
    model_path: str | None = Field(default=None, description="a .gguf file; default: the packaged Gemma 3 270M")
    n_ctx: int = Field(default=2048, ge=256, le=131072)
    n_threads: int | None = Field(default=None, ge=1, description="default: the machine's cores")
    max_input_tokens: int = Field(default=768, ge=32, description="document tokens kept; the rest is truncated")
    classify_strategy: ClassifyStrategy = Field(
        default="auto",
        description="auto: the strategy and encoder that cross-validate best on the job's examples (cheapest "
        "among equals); without 4 examples per label: similarity or label scoring",
    )
    calibration: Literal["content_free", "batch", "none"] = Field(
        default="content_free",
        description="label scoring: divide by the label prior on content-free input or batch",
    )
    few_shot: int = Field(
        default=24,
        ge=0,
        le=128,
        description="label scoring: most labeled examples shown in the prompt (fewer if long)",
    )
    max_candidates: int = Field(default=48, ge=1, le=256, description="extraction: candidates scored per field")
    candidate_scoring: Literal["sum", "mean"] = Field(
        default="sum",
        description="extraction: sum ranks candidates by their likelihood; mean by likelihood per token",
    )
    usd_per_hour: float = Field(default=0.0, ge=0, description="self-hosted compute price for the cost ledger")

    @field_validator("model_path")
    @classmethod
    def _resolve(cls, path: str | None, info: ValidationInfo) -> str | None:
        return None if path is None else _resolve_path(path, info)

    @property
    def model_name(self) -> str:
        from pathlib import Path

        return Path(self.model_path).name if self.model_path else "gemma-3-270m-q4_k_m.gguf"


VisionFamily = Literal["qwen2_vl", "qwen3_vl", "gemma3", "idefics3"]
"""Prompt formats of the vision-language models the vLLM vision path knows (engines/local/vllm_vision.py)."""

_VISION_FAMILIES: tuple[tuple[VisionFamily, re.Pattern[str]], ...] = (
    ("qwen2_vl", re.compile(r"qwen2([._]5)?[-_]?vl", re.IGNORECASE)),
    ("qwen3_vl", re.compile(r"qwen3[-_]?vl", re.IGNORECASE)),
    ("gemma3", re.compile(r"gemma-?3-(4|12|27)b", re.IGNORECASE)),
    ("idefics3", re.compile(r"smolvlm|idefics3", re.IGNORECASE)),
)


def vision_family(model: str) -> VisionFamily | None:
    """The prompt format a model's name says it has (Qwen/Qwen2.5-VL-3B-Instruct: qwen2_vl), or None."""
    for family, pattern in _VISION_FAMILIES:
        if pattern.search(model):
            return family
    return None


class VllmVisionSpec(StrictModel):
    """Scanned documents (images, PDF pages without a text layer) also shown to the model as page images.

    The small model must then be a vision-language model vLLM serves. Documents with text stay on the text path;
    a scanned one gets the same label-scoring and candidate prompts with its first pages attached, candidates
    still taken from its OCR text, and confidences read from log-probabilities exactly as on the text path.
    """

    family: Literal["auto", "qwen2_vl", "qwen3_vl", "gemma3", "idefics3"] = Field(
        default="auto",
        description="the model's image placeholder format; auto: from the model name (Qwen2/2.5-VL, Qwen3-VL, "
        "Gemma 3 4B+, SmolVLM/Idefics3)",
    )
    max_pages: int = Field(default=2, ge=1, le=16, description="pages shown (the first ones); OCR text covers all")
    max_pixels: int = Field(
        default=1280 * 28 * 28,
        ge=64 * 64,
        le=16_000_000,
        description="each page image is scaled down to at most this many pixels before it is sent",
    )
    page_tokens: int | None = Field(
        default=None, ge=1, description="prompt tokens one page costs; default: the family's estimate"
    )
    ocr_text: bool = Field(default=True, description="also show the OCR text beside the page images")
    documents_per_call: int = Field(
        default=16, ge=1, le=4096, description="documents whose page images are decoded and sent in one vLLM call"
    )


class VllmSpec(_SmallModelParts):
    """In-process vLLM on a GPU worker: one offline `vllm.LLM` per worker process, one batched call per shard."""

    engine: Literal["vllm"] = "vllm"
    model: str = Field(min_length=1, description="Hugging Face id or local path of the model")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int | None = Field(default=None, ge=256)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    quantization: str | None = Field(default=None, description="e.g. awq, gptq, fp8")
    lora_path: str | None = Field(default=None, description="a LoRA adapter served on top of the model")
    seed: int = 0
    max_input_tokens: int = Field(default=4096, ge=32)
    max_output_tokens: int = Field(default=256, ge=1)
    max_candidates: int = Field(default=48, ge=1, le=256)
    few_shot: int = Field(
        default=24, ge=0, le=128, description="label scoring: most labeled examples shown in the prompt (fewer if long)"
    )
    calibration: Literal["content_free", "batch", "none"] = Field(
        default="content_free",
        description="label and enum/bool priors: content-free input, the shard itself (>= 8 docs), or none",
    )
    candidate_scoring: Literal["sum", "mean"] = Field(
        default="sum", description="extraction: rank candidates by likelihood or likelihood per token"
    )
    extract_strategy: Literal["candidates", "generate"] = Field(
        default="candidates",
        description="candidates: choose among values found in the document, JSON only for fields with none; "
        "generate: JSON for every field",
    )
    enable_prefix_caching: bool = True
    usd_per_hour: float = Field(default=0.0, ge=0, description="GPU-hour price for the cost ledger")
    vision: VllmVisionSpec | None = Field(
        default=None,
        exclude_if=lambda vision: vision is None,  # jobs without it keep their spec hash
        description="scanned documents also as page images to a vision-language model (written, not yet run on a "
        "GPU: README)",
    )

    @field_validator("lora_path")
    @classmethod
    def _resolve(cls, path: str | None, info: ValidationInfo) -> str | None:
        return None if path is None else _resolve_path(path, info)

    @model_validator(mode="after")
    def _vision_family(self) -> Self:
        if self.vision is not None and self.vision.family == "auto":
            family = vision_family(self.model)
            if family is None:
                known = ", ".join(name for name, _ in _VISION_FAMILIES)
                raise ValueError(
                    f"vision: cannot tell the image prompt format of {self.model!r} from its name; set "
                    f"small_model.vision.family to one of {known}"
                )
            object.__setattr__(self, "vision", self.vision.model_copy(update={"family": family}))
        return self

    @property
    def model_name(self) -> str:
        return self.model


class OpenAICompatibleSmallSpec(_SmallModelParts):
    """A small model served behind an OpenAI-compatible endpoint (vllm serve, llama.cpp server)."""

    engine: Literal["openai_compatible"] = "openai_compatible"
    model: str = Field(min_length=1)
    base_url: str = Field(min_length=1)
    api_key: SecretStr | None = Field(default=None, repr=False)
    server: Literal["generic", "vllm", "llamacpp"] = Field(
        default="generic",
        description="vllm also sends vLLM's structured_outputs extra body; llamacpp sends the JSON schema in the "
        "json_object form llama-cpp-python's server enforces",
    )
    max_concurrency: int = Field(default=8, ge=1, le=512)
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=4, ge=0, le=20)
    max_input_tokens: int = Field(default=4096, ge=32, description="document tokens sent; the rest is truncated")
    max_output_tokens: int = Field(default=512, ge=1)
    usd_per_hour: float = Field(default=0.0, ge=0)

    @property
    def model_name(self) -> str:
        return self.model


SmallModelSpec = Annotated[LlamaCppSpec | VllmSpec | OpenAICompatibleSmallSpec, Field(discriminator="engine")]

_DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY", "openai_compatible": None}


class FrontierSpec(StrictModel):
    """The large model that answers the rows the small one is unsure of."""

    provider: Literal["openai", "anthropic", "openai_compatible"]
    model: str = Field(min_length=1)
    base_url: str | None = None
    api_key: SecretStr | None = Field(default=None, repr=False)
    api_key_env: str | None = Field(
        default=None,
        description="environment variable holding the key; default OPENAI_API_KEY/ANTHROPIC_API_KEY",
    )
    price: ModelPrice | None = Field(default=None, description="USD per 1M tokens; default from the price table")
    max_concurrency: int = Field(default=8, ge=1, le=512, description="frontier calls in flight per process")
    concurrency_limit: str | None = Field(
        default=None,
        min_length=1,
        description="a Prefect global concurrency limit every frontier call holds one slot of while in flight, "
        "capping calls across all workers (`docroute setup` creates `docroute-frontier`); none: only the "
        "per-process max_concurrency applies",
    )
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=4, ge=0, le=20)
    max_output_tokens: int = Field(default=512, ge=16)
    max_input_tokens: int = Field(default=32000, ge=256, description="document tokens sent; the rest is truncated")
    mode: Literal["sync", "batch"] = Field(
        default="sync",
        description="batch: escalations go through the OpenAI Batch API (50% cheaper, answers within 24 h); "
        "rows wait as deferred and a later run collects them",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="provider-specific request fields, e.g. reasoning_effort"
    )

    @model_validator(mode="after")
    def _key_and_price(self, info: ValidationInfo) -> Self:
        if self.mode == "batch" and self.provider != "openai":
            raise ValueError("batch mode is implemented for the OpenAI Batch API: use provider openai")
        try:
            lookup_price(self.model, self.price)  # an unpriced model is an error: never a silent $0
        except UnknownModelPriceError as exc:
            raise ValueError(str(exc)) from None
        if self.provider == "openai_compatible" and not self.base_url:
            raise ValueError("an openai_compatible frontier needs base_url")
        if self.api_key is None:
            env = (info.context or {}).get("env") or {}
            name = self.api_key_env or _DEFAULT_KEY_ENV[self.provider]
            if name and env.get(name):
                object.__setattr__(self, "api_key", SecretStr(env[name]))
        return self

    @property
    def unit_price(self) -> ModelPrice:
        return lookup_price(self.model, self.price)


class RoutingSpec(StrictModel):
    """When a small-model answer is kept, and how much the frontier may cost."""

    threshold: float = Field(default=0.8, ge=0, le=1, description="minimum confidence to keep a small-model answer")
    field_thresholds: dict[str, float] = Field(default_factory=dict, description="per extracted field overrides")
    max_frontier_usd: float | None = Field(
        default=5.0, ge=0, description="hard cap on frontier spend per run; null means no cap"
    )
    target_accuracy: float = Field(
        default=0.95, gt=0, lt=1, description="docroute calibrate: accuracy the kept rows must reach"
    )
    delta: float = Field(
        default=0.05, gt=0, lt=1, description="docroute calibrate: allowed probability that the guarantee fails"
    )
    certification: Literal["bonferroni", "fixed-sequence"] = Field(
        default="bonferroni",
        description="docroute calibrate: bonferroni tests every threshold of a fixed grid at delta/grid size; "
        "fixed-sequence orders thresholds on 20% of the labels and tests down from there at full delta (valid, "
        "usually fewer escalations, needs more labels); with guarantee overall, fixed-sequence tests down from the "
        "top on every label at full delta and is never more conservative than bonferroni",
    )
    guarantee: Literal["kept", "overall"] = Field(
        default="kept",
        description="docroute calibrate: what target_accuracy bounds. kept: the accuracy of the rows the small model "
        "keeps, so every kept row is trustworthy on its own (choose it when rows feed automated actions); overall: "
        "the accuracy of the whole routed output relative to the frontier (only kept-and-wrong rows count against "
        "it; choose it for dataset-level quality such as analytics, where it escalates far fewer rows)",
    )
    guarantee_unit: Literal["part", "document"] = Field(
        default="part",
        description="docroute calibrate, with several required parts (a label and fields): part: target_accuracy "
        "bounds each part on its own (the label's accuracy, each field's); document: it bounds whole documents, "
        "right only when every required part is, with one threshold on the least confident part (more escalation; "
        "choose it when a row is used as a whole, e.g. a receipt's company, date and total together)",
    )
    use_router: bool = Field(
        default=True, description="use the calibrated <output>/router.json when it matches this job's spec hash"
    )
    audit_fraction: float = Field(
        default=0.0, ge=0, le=1, description="share of kept rows also sent to the frontier to check agreement"
    )

    @field_validator("field_thresholds")
    @classmethod
    def _in_unit_interval(cls, thresholds: dict[str, float]) -> dict[str, float]:
        for name, value in thresholds.items():
            if not 0 <= value <= 1:
                raise ValueError(f"threshold for {name!r} must be within [0, 1]")
        return thresholds


DELTA_SCHEMES = ("", "file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
"""URL schemes delta-rs writes to ("" is a local path); other fsspec stores (memory://, sftp://…) it cannot."""


class IcebergCatalogSpec(StrictModel):
    """The Iceberg catalog that names the current table (`output.table.format: iceberg`), as pyiceberg loads it.

    `sql`: a SQLAlchemy URL (`sqlite:////abs/path/catalog.db`, `postgresql+psycopg://host/db`); `rest`: the REST
    catalog's endpoint (Polaris, Nessie, Lakekeeper, Unity, Snowflake Open Catalog); `glue`: AWS Glue, no uri.
    Anything else pyiceberg takes for that catalog (`warehouse`, `credential`, `token`, `glue.region`…) goes in
    `properties`, or in `properties_env` as the name of an environment variable holding the value. Every property
    is a secret (they hold credentials): none is printed or logged.
    """

    name: str = Field(default="docroute", min_length=1, description="the catalog's name, as pyiceberg reports it")
    type: Literal["sql", "rest", "glue"] = "sql"
    uri: SecretStr | None = Field(
        default=None, repr=False, description="sql: SQLAlchemy URL; rest: endpoint; glue: none (may hold a password)"
    )
    namespace: str = Field(default="docroute", min_length=1, description="the table's namespace (Glue: database)")
    table: str | None = Field(
        default=None, description="the table's name; default: the job's name with '-' as '_' (docroute.<job name>)"
    )
    properties: dict[str, SecretStr] = Field(default_factory=dict, repr=False, description="more catalog properties")
    properties_env: dict[str, str] = Field(
        default_factory=dict, description="catalog properties read from environment variables: property -> variable"
    )

    @model_validator(mode="after")
    def _uri_and_env(self, info: ValidationInfo) -> Self:
        if self.type in ("sql", "rest") and self.uri is None and "uri" not in self.properties_env:
            raise ValueError(f"an Iceberg {self.type} catalog needs a uri")
        env = (info.context or {}).get("env") or {}
        found = {prop: SecretStr(env[name]) for prop, name in self.properties_env.items() if env.get(name)}
        if found:
            object.__setattr__(self, "properties", {**self.properties, **found})
        return self

    def pyiceberg_properties(self) -> dict[str, str]:
        """The properties `pyiceberg.catalog.load_catalog` takes (secrets revealed: hand them to pyiceberg only)."""
        properties = {key: value.get_secret_value() for key, value in self.properties.items()}
        properties["type"] = self.type
        if self.uri is not None:
            properties["uri"] = self.uri.get_secret_value()
        return properties


class DeletedRows(StrEnum):
    """What the current table does with a document whose file left the source."""

    MARK = "mark"  # keep its last row, `deleted_at` set (the default: nothing is lost, a filter shows current rows)
    DROP = "drop"  # remove its row from the table (the results history and the state keep it)


class CurrentTableSpec(StrictModel):
    """The current table: one row per document, kept equal to `current_rows()` by every run (tasks/store/table.py).

    `delta` (default): a Delta Lake table at `<output>/tables/documents`, no catalog. `iceberg`: an Apache Iceberg
    table registered in `catalog` (tasks/store/iceberg_table.py); with no catalog named, a local output gets a SQL
    catalog on SQLite at `<output>/tables/catalog.db`.
    """

    enabled: bool = Field(default=True, description="maintain the current table; off: runs never touch it")
    format: Literal["delta", "iceberg"] = "delta"
    deleted: DeletedRows = Field(
        default=DeletedRows.MARK,
        description="a document whose file left the source: mark (keep its row, deleted_at set) or drop its row",
    )
    catalog: IcebergCatalogSpec | None = Field(
        default=None, description="iceberg: the catalog holding the table; default, local outputs only: SQLite"
    )

    @model_validator(mode="after")
    def _catalog_for_iceberg(self) -> Self:
        if self.catalog is not None and self.format != "iceberg":
            raise ValueError("output.table.catalog applies to format: iceberg only (a Delta table needs none)")
        return self


class CompactionSpec(StrictModel):
    """How `docroute compact` coalesces the results history and how long replaced files stay (tasks/store/compact.py).

    Replaced parts, leftovers of dead runs and old state snapshots are deleted only once older than
    `retention_hours`, so a reader that listed the files before a compaction can still finish reading them.
    """

    target_file_mb: float = Field(
        default=128.0, gt=0, le=4096, description="coalesce a run date's small results parts into files of about this"
    )
    retention_hours: float = Field(
        default=168.0,
        ge=0,
        le=24 * 3650,
        description="replaced parts, dead runs' leftovers, old snapshots and table versions stay this long",
    )


class OutputSpec(StorageAccess):
    """Where the Parquet results, cost ledger and manifests go."""

    url: str = Field(min_length=1)
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    lease_ttl_s: float = Field(
        default=60.0,
        ge=1.0,
        le=86_400.0,
        description=(
            "a run renews its lease on the output every quarter of this; a run on another host that stops "
            "renewing for this long is taken for dead and the next run takes over its work (same-host deaths "
            "are seen at once)"
        ),
    )

    table: CurrentTableSpec = Field(
        default_factory=CurrentTableSpec,
        description="the current table every run keeps (on by default wherever delta-rs can write the output)",
    )
    compaction: CompactionSpec = Field(
        default_factory=CompactionSpec, description="what `docroute compact` coalesces and how long it keeps files"
    )

    @field_validator("url")
    @classmethod
    def _resolve(cls, url: str, info: ValidationInfo) -> str:
        return _resolve_path(url, info).rstrip("/")

    @model_validator(mode="after")
    def _table_where_delta_writes(self) -> Self:
        """The default table is off on a store delta-rs cannot write; asking for it there is an error."""
        scheme = self.url.split("://", 1)[0] if "://" in self.url else ""
        if (
            self.table.enabled
            and self.table.format == "iceberg"
            and self.table.catalog is None
            and scheme not in ("", "file")
        ):
            raise ValueError(
                f"output.table.format iceberg on a {scheme}:// output needs output.table.catalog: the default SQLite "
                "catalog file cannot live on an object store; name a SQL catalog on a database or a local SQLite "
                "file (type: sql, uri: sqlite:////var/lib/docroute/catalog.db), a REST catalog (type: rest, uri: "
                "https://…) or AWS Glue (type: glue)"
            )
        if self.table.enabled and scheme not in DELTA_SCHEMES:
            if "table" in self.model_fields_set:
                raise ValueError(
                    f"output.table needs a store delta-rs writes ({', '.join(DELTA_SCHEMES[1:])}, or a "
                    f"local path), not {scheme}://; set table: {{enabled: false}}"
                )
            object.__setattr__(self, "table", CurrentTableSpec(enabled=False))
        return self

    @property
    def layout(self) -> OutputLayout:
        """Every path under this output (schemas/layout.py): the one place they are built and parsed."""
        return OutputLayout(self.url)


class DaskRunnerSpec(StrictModel):
    """A Dask cluster for shard tasks: an existing scheduler, or a local cluster the run starts and stops."""

    address: str | None = Field(default=None, description="scheduler address, e.g. tcp://dask-scheduler:8786")
    n_workers: int = Field(default=2, ge=1, le=1024, description="worker processes of a local cluster")
    threads_per_worker: int = Field(default=1, ge=1, le=64, description="threads per local worker process")

    @model_validator(mode="after")
    def _address_or_local(self) -> Self:
        if self.address is not None and not self.address.strip():
            raise ValueError("dask.address cannot be empty: leave it out to start a local cluster")
        return self


class RayRunnerSpec(StrictModel):
    """A Ray cluster for shard tasks; each shard task asks Ray for `num_cpus` and `num_gpus`."""

    address: str | None = Field(default=None, description="e.g. ray://head:10001; none starts a local Ray")
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per shard task (vLLM: usually 1)")


class RunnerSpec(StrictModel):
    """Where shard tasks run.

    `threads` (the default) runs them in the flow's process: the embedded model serialises its own calls and the
    threads overlap I/O. `dask` and `ray` fan shards out over a cluster's worker processes; each worker builds the
    model once and keeps it for every shard it runs. `max_workers` is the number of shards in flight either way,
    which also bounds the flow's memory: for a cluster, set it to about the number of worker slots.
    """

    kind: Literal["threads", "dask", "ray"] = "threads"
    max_workers: int = Field(default=2, ge=1, le=4096)
    dask: DaskRunnerSpec | None = None
    ray: RayRunnerSpec | None = None

    @model_validator(mode="after")
    def _options_match_kind(self) -> Self:
        for kind in ("dask", "ray"):
            if getattr(self, kind) is not None and self.kind != kind:
                raise ValueError(f"runner.{kind} options are set but runner.kind is {self.kind!r}")
        if self.kind == "dask" and self.dask is None:
            object.__setattr__(self, "dask", DaskRunnerSpec())
        if self.kind == "ray" and self.ray is None:
            object.__setattr__(self, "ray", RayRunnerSpec())
        return self

    @property
    def distributed(self) -> bool:
        """True when shards run in other processes (no per-process state is shared with the flow)."""
        return self.kind != "threads"


class JobSpec(StrictModel):
    """A complete docroute job."""

    name: str = Field(description="lowercase letters, digits and dashes; names the job's Prefect artifacts")
    source: SourceSpec
    task: TaskSpec
    small_model: SmallModelSpec = Field(default_factory=LlamaCppSpec)
    frontier: FrontierSpec | None = None
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    output: OutputSpec
    shard_size: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="documents per Prefect task run; default: sized to the run (see shard_size_for)",
    )
    runner: RunnerSpec = Field(default_factory=RunnerSpec)

    def shard_size_for(self, documents: int) -> int:
        """Documents per shard for a run of `documents`: the job's `shard_size`, else sized to the run.

        A shard is one Prefect task run, ~10 ms of bookkeeping under the GIL: with a cheap encoder 100,000 messages
        in shards of 64 spent more time in Prefect than in the model (1,246 documents/s against 3,517 in shards of
        2,048). Aiming at 16 shards per worker keeps progress and crash recovery granular on small runs (never
        under 64 documents) and the task overhead bounded on large ones (never over 2,048).
        """
        if self.shard_size is not None:
            return self.shard_size
        per_shard = -(-max(documents, 1) // (16 * self.runner.max_workers))
        return min(max(per_shard, AUTO_SHARD_MIN), AUTO_SHARD_MAX)

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        if not _JOB_NAME.match(name):
            raise ValueError("job name must be 1-63 lowercase letters, digits or dashes, starting alphanumeric")
        return name

    @field_validator("routing")
    @classmethod
    def _routing_names_fields(cls, routing: RoutingSpec, info: ValidationInfo) -> RoutingSpec:
        task = info.data.get("task")  # absent when the task itself failed validation
        if task is None:
            return routing
        known = {f.name for f in task.extract.fields} if task.extract else set()
        unknown = sorted(set(routing.field_thresholds) - known)
        if unknown:
            raise ValueError(f"field_thresholds names unknown fields: {', '.join(unknown)}")
        return routing

    def field_threshold(self, field_name: str) -> float:
        """Return the confidence a field needs to be kept."""
        return self.routing.field_thresholds.get(field_name, self.routing.threshold)

    def encoder_price(self) -> ModelPrice | None:
        """What the small model's encoder charges per token, when it is a paid embeddings API (else None)."""
        encoder = self.small_model.encoder
        return encoder.unit_price if isinstance(encoder, OpenAICompatibleEncoderSpec) else None

    def small_cost_usd(self, engine_seconds: float, encoder_tokens: int = 0) -> float:
        """A row's small-model cost: its compute time at `usd_per_hour`, plus a paid encoder's tokens."""
        compute = self_hosted_cost_usd(engine_seconds, self.small_model.usd_per_hour)
        return compute + encoder_cost_usd(self.encoder_price(), encoder_tokens)

    def spec_hash(self) -> str:
        """Hash what decides a row's answer (task and small model), so changing either reprocesses documents."""
        payload = {
            "task": self.task.model_dump(mode="json"),
            "small_model": self.small_model.model_dump(
                mode="json",
                exclude={"n_threads", "usd_per_hour", "max_concurrency", "timeout_s", "max_retries"},
            ),
        }
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def redacted(self) -> dict[str, Any]:
        """Return the spec as plain data with every secret and storage option masked, for logs and artifacts."""
        data = self.model_dump(mode="json")
        for part in ("source", "output"):
            data[part]["storage_options"] = {k: "***" for k in data[part]["storage_options"]}
            if data[part].get("s3"):
                for secret in ("key", "secret", "token"):
                    if data[part]["s3"].get(secret) is not None:
                        data[part]["s3"][secret] = "***"
        if data.get("frontier"):
            data["frontier"]["api_key"] = "***" if self.frontier and self.frontier.api_key else None
        if data["small_model"].get("api_key"):
            data["small_model"]["api_key"] = "***"
        encoder = data["small_model"].get("encoder")
        if isinstance(encoder, dict) and encoder.get("api_key"):
            encoder["api_key"] = "***"
        return data
