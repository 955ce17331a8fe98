"""The GPU engine: a small model under in-process vLLM (offline `vllm.LLM`), one batched call per shard.

It asks the same questions, in the same few-shot text, as the embedded llama.cpp engine
(engines/scoring/fewshot.py), and
turns the model's log-probabilities into confidences with the same maths (engines/scoring/confidence.py):

* Classification by label scoring: log P(label words | prompt) for every label, a softmax over the whole label
  set and contextual calibration by the label prior on content-free input. The confidence is a probability over
  all labels, not the renormalised probability of one constrained token.
* Extraction by choosing each field's value among candidates taken from the document (engines/scoring/candidates.py),
  scored the same way; the confidence is the chosen value's share of the candidate set's probability.
* Fields that have no candidate in a document (or every field, with `extract_strategy: generate`) are generated
  as JSON under vLLM's structured outputs (the answer schema of engines/scoring/prompts.py); their confidence is
  exp(sum of the value tokens' log-probabilities).

How scores are read from vLLM is in engines/local/vllm_scoring.py. Every prompt starts with the task's fixed text,
then the document, then the question, so vLLM's prefix cache computes the shared part once per shard and a
document's part once for all its labels or candidates.

vLLM is imported only when a runtime is created; prompt building, sampling-parameter construction and output
parsing are plain functions of plain data, tested without a GPU (tests/test_vllm.py).

With `small_model.vision`, scanned documents also show the model their first page images (the pure part is
engines/local/vllm_vision.py, tested in tests/test_vllm_vision.py): the same prompts with the pages placed before
the OCR text, the same candidates and the same confidences. Written against vLLM's documented multimodal inputs;
not yet run on a GPU.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, cast

import numpy as np

from docroute.engines.base import EngineUnavailableError, Prediction, Request, check_complete
from docroute.engines.local import vllm_vision
from docroute.engines.local.vllm_scoring import (
    TriePlan,
    apportion,
    mean_softmax,
    prompt_logprob_score,
    read_ids,
    request_usage,
    token_pieces,
    total_usage,
    trie_plan,
    trie_scores,
)
from docroute.engines.local.vllm_vision import DocPages, call_groups, doc_pages, family_of, mm_prompt, page_markup
from docroute.engines.scoring import fewshot
from docroute.engines.scoring.candidates import candidates_for
from docroute.engines.scoring.confidence import (
    choice_probabilities,
    choose_value,
    contextual_calibration,
    pick,
    softmax,
)
from docroute.engines.scoring.fewshot import truncate_tokens
from docroute.engines.scoring.prompts import AnswerError, answer_schema, chat_messages, parse_answer, value_confidences
from docroute.schemas.spec import ExtractSpec, FieldSpec, TaskSpec, VllmSpec

INSTALL_HINT = "pip install 'docroute[vllm]'"
NO_GPU_MESSAGE = "vLLM needs a CUDA GPU; none was found"

CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")
"""Inputs that say nothing, used to estimate the label bias of the prompt (Zhao et al. 2021); as llama.cpp's."""

QUESTION_RESERVE = 32
"""Tokens kept free beside the document for the question segment and the wrappers around the document."""

MIN_VISION_TEXT_TOKENS = 32
"""A scanned document's page images must leave at least this many tokens of the context for its OCR text."""

MAX_CANDIDATE_TOKENS = 256
"""A candidate continuation longer than this is no field value; it is not scored."""

CHAT_SENTINEL = "\u2063docroute-document\u2063"
"""Stands in for the document while a chat template is rendered, so the document is tokenized apart."""

BATCH_CALIBRATION_MIN = 8
"""calibration=batch uses the shard's own mean prediction as the prior from this many documents on."""

PARAMS_CACHE_SIZE = 65536
"""SamplingParams kept for reuse; trie reads ask few distinct sets of ids, candidate reads many."""

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The max_lora_rank values vLLM accepts (vllm.config.lora.MaxLoRARanks)."""

# ----------------------------------------------------------------------------------------------------------
# import and device checks


def import_vllm() -> ModuleType:
    """Import vllm, or say what is missing."""
    try:
        import vllm
    except ImportError as exc:
        raise EngineUnavailableError(
            f"the vllm engine needs the vllm package, which cannot be imported ({exc}); {INSTALL_HINT}"
        ) from exc
    except (OSError, RuntimeError) as exc:  # a wheel built for another CUDA or torch than the one installed
        raise EngineUnavailableError(f"vllm is installed but fails to import here: {exc}") from exc
    return vllm


def require_gpu(tensor_parallel_size: int = 1) -> None:
    """Refuse to start without enough CUDA devices (vLLM's CPU build is not what docroute targets)."""
    try:
        import torch
    except ImportError as exc:
        raise EngineUnavailableError(f"the vllm engine needs torch ({exc}); {INSTALL_HINT}") from exc
    if not torch.cuda.is_available():
        raise EngineUnavailableError(f"{NO_GPU_MESSAGE} (torch.cuda.is_available() is False)")
    count = torch.cuda.device_count()
    if count < tensor_parallel_size:
        raise EngineUnavailableError(
            f"small_model.tensor_parallel_size is {tensor_parallel_size} but only {count} CUDA device(s) are visible"
        )


def supports_token_id_logprobs(sampling_params_cls: type) -> bool:
    """Whether SamplingParams can return the log-probabilities of chosen token ids (vLLM >= 0.21).

    0.20 has the field but returns nothing unless `logprobs` is also set (it lacks `num_logprobs`), so it counts
    as unsupported and scoring falls back to prompt log-probabilities.
    """
    fields = getattr(sampling_params_cls, "__struct_fields__", ())
    return "logprob_token_ids" in fields and hasattr(sampling_params_cls, "num_logprobs")


# ----------------------------------------------------------------------------------------------------------
# requests: plain descriptions, turned into vLLM objects only by the runtime


@dataclass(frozen=True, slots=True)
class Call:
    """One vLLM request over a token prompt.

    The prompt is `base + path`: the many calls of one document share one `base` tuple (the fixed text, the
    document and the question) and differ only in a short `path`, so a shard's calls do not hold a copy of the
    document each. Exactly one of: `read_ids` (a one-token generation reading these ids' next-token
    log-probabilities), `prompt_scoring` (a one-token generation returning prompt log-probabilities), `schema`
    (a JSON string: a structured generation of up to `max_tokens` tokens, with each token's log-probability).
    `images`: the document's page images, whose placeholders `base` holds (the vision path), or None.
    """

    base: tuple[int, ...]
    path: tuple[int, ...] = ()
    read_ids: tuple[int, ...] = ()
    prompt_scoring: bool = False
    schema: str | None = None
    max_tokens: int = 1
    images: DocPages | None = None

    def __post_init__(self) -> None:
        kinds = (bool(self.read_ids), self.prompt_scoring, self.schema is not None)
        if sum(kinds) != 1:
            raise ValueError("a call reads token ids, scores its prompt, or generates JSON: exactly one")

    @property
    def prompt(self) -> list[int]:
        return [*self.base, *self.path]

    def __len__(self) -> int:
        return len(self.base) + len(self.path)


def sampling_kwargs(call: Call) -> dict[str, Any]:
    """The SamplingParams keyword arguments of a call: greedy, and no detokenizing where only numbers are read.

    `structured_outputs` is returned as a plain dict ({"json": schema}); the runtime wraps it in
    StructuredOutputsParams. Logprobs are vLLM's default "raw" ones: the model's own distribution before the
    grammar mask, so a constrained value's confidence is not inflated by the constraint.
    """
    if call.read_ids:
        return {"temperature": 0.0, "max_tokens": 1, "logprob_token_ids": list(call.read_ids), "detokenize": False}
    if call.prompt_scoring:
        return {"temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 0, "detokenize": False}
    assert call.schema is not None
    return {
        "temperature": 0.0,
        "max_tokens": call.max_tokens,
        "logprobs": 0,  # the sampled token's log-probability only
        "structured_outputs": {"json": json.loads(call.schema)},
    }


def make_sampling_params(kwargs: dict[str, Any], vllm_module: Any) -> Any:
    """Build a real SamplingParams (and StructuredOutputsParams) from `sampling_kwargs` output."""
    from vllm.sampling_params import StructuredOutputsParams

    kwargs = dict(kwargs)
    structured = kwargs.pop("structured_outputs", None)
    if structured is not None:
        kwargs["structured_outputs"] = StructuredOutputsParams(**structured)
    return vllm_module.SamplingParams(**kwargs)


def llm_kwargs(spec: VllmSpec, *, lora_rank: int | None = None) -> dict[str, Any]:
    """The vllm.LLM keyword arguments for a spec (one LLM per worker process)."""
    kwargs: dict[str, Any] = {
        "model": spec.model,
        "dtype": spec.dtype,
        "gpu_memory_utilization": spec.gpu_memory_utilization,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "seed": spec.seed,
        "enable_prefix_caching": spec.enable_prefix_caching,
    }
    if spec.max_model_len is not None:
        kwargs["max_model_len"] = spec.max_model_len
    if spec.quantization:
        kwargs["quantization"] = spec.quantization
    if spec.lora_path:
        kwargs["enable_lora"] = True
        kwargs["max_loras"] = 1
        kwargs["max_lora_rank"] = lora_rank or 16
    if spec.vision is not None:
        kwargs.update(vllm_vision.llm_kwargs(spec.vision))
    return kwargs


def prompt_inputs(calls: Sequence[Call]) -> list[dict[str, Any]]:
    """vLLM's prompts for calls: token ids, with the page images where a call shows them (rendered once per
    document here, and dropped with the returned list)."""
    rendered: dict[int, list[Any]] = {}
    prompts: list[dict[str, Any]] = []
    for call in calls:
        if call.images is None:
            prompts.append({"prompt_token_ids": call.prompt})
            continue
        images = rendered.get(id(call.images))
        if images is None:
            images = rendered[id(call.images)] = call.images.render()
        prompts.append(mm_prompt(call.prompt, images, call.images.uuids()))
    return prompts


def lora_rank(lora_path: str) -> int | None:
    """The adapter's rank rounded up to a value vLLM accepts, read from a local adapter_config.json."""
    config = Path(lora_path) / "adapter_config.json"
    try:
        rank = int(json.loads(config.read_text()).get("r", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if rank <= 0:
        return None
    return next((r for r in LORA_RANKS if r >= rank), LORA_RANKS[-1])


# ----------------------------------------------------------------------------------------------------------
# the runtime: one vllm.LLM per worker process


class Runtime(Protocol):
    """What the engine needs from a model: tokens, a context length, and one batched call at a time."""

    max_model_len: int
    supports_token_ids: bool

    def encode(self, text: str) -> list[int]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...

    def bos(self) -> list[int]: ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]: ...

    def run(self, calls: Sequence[Call]) -> tuple[list[Any], float]: ...


class VisionRuntime(Runtime, Protocol):
    """A runtime that can also show page images: image placeholders as markup tokens, and in a chat prompt."""

    def markup(self, text: str) -> list[int]: ...

    def chat_prompt(self, messages: list[dict[str, str]], lead: str = "") -> list[int]: ...


class TokenizerGlue:
    """Plain-text tokens, BOS and chat prompts from a Hugging Face tokenizer (what `LLM.get_tokenizer()` gives)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._bos: list[int] | None = None

    def encode(self, text: str) -> list[int]:
        """Tokens of plain text: a special-token string inside a document (`<|im_end|>`) stays text."""
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
        except TypeError:  # a tokenizer without the option
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode_markup(self, text: str) -> list[int]:
        """Tokens of chat-template text, whose special-token strings are meant as special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def markup(self, text: str) -> list[int]:
        """Tokens of prompt markup (image placeholders): special-token strings become the special tokens."""
        return self._encode_markup(text)

    def decode(self, tokens: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True))

    def bos(self) -> list[int]:
        """The tokens the tokenizer puts before a text (BOS for Llama/Gemma, nothing for Qwen)."""
        if self._bos is None:
            plain = self.encode("x")
            full = list(self.tokenizer.encode("x", add_special_tokens=True))
            self._bos = special_prefix(full, plain)
        return self._bos

    def chat_prompt(self, messages: list[dict[str, str]], lead: str = "") -> list[int]:
        """The messages under the model's chat template (plain text for a model without one).

        The last message (the fenced document) is tokenized as plain text and the template around it as markup,
        so a document cannot close its own turn with the model's special tokens. `lead` (image placeholders) is
        markup put at the start of that message.
        """
        if getattr(self.tokenizer, "chat_template", None):
            last = messages[-1]
            marked = [*messages[:-1], {"role": last["role"], "content": CHAT_SENTINEL}]
            for attempt in (marked, merge_system(marked)):
                try:
                    text = self.tokenizer.apply_chat_template(attempt, tokenize=False, add_generation_prompt=True)
                except Exception:  # templates raise anything (e.g. no system role): try a plainer form
                    continue
                parts = str(text).split(CHAT_SENTINEL)
                if len(parts) == 2:
                    head = self._encode_markup(parts[0] + lead)
                    return head + self.encode(last["content"]) + self._encode_markup(parts[1])
        if lead:
            body, question = "\n\n".join(m["content"] for m in messages[:-1]), plain_chat(messages[-1:])
            return self.bos() + self.encode(f"{body}\n\n") + self._encode_markup(lead) + self.encode(question)
        return self.bos() + self.encode(plain_chat(messages))


class VllmRuntime:
    """One vllm.LLM and its tokenizer; `run` sends one batch of calls in one `LLM.generate` and times it."""

    def __init__(self, spec: VllmSpec) -> None:
        vllm = import_vllm()
        require_gpu(spec.tensor_parallel_size)
        rank = lora_rank(spec.lora_path) if spec.lora_path else None
        try:
            self.llm = vllm.LLM(**llm_kwargs(spec, lora_rank=rank))
        except (ValueError, RuntimeError, OSError) as exc:
            raise EngineUnavailableError(f"vLLM could not load {spec.model}: {exc}") from exc
        self._vllm = vllm
        self.tokens = TokenizerGlue(self.llm.get_tokenizer())
        model_config = getattr(self.llm, "model_config", None) or self.llm.llm_engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.supports_token_ids = supports_token_id_logprobs(vllm.SamplingParams)
        self.lora_request = None
        if spec.lora_path:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest(Path(spec.lora_path).name or "adapter", 1, spec.lora_path)
        self.lock = threading.Lock()
        self.memo: dict[str, Any] = {}
        self._params: dict[str, Any] = {}  # SamplingParams by their kwargs: trie reads repeat few id sets

    def encode(self, text: str) -> list[int]:
        return self.tokens.encode(text)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokens.decode(tokens)

    def bos(self) -> list[int]:
        return self.tokens.bos()

    def chat_prompt(self, messages: list[dict[str, str]], lead: str = "") -> list[int]:
        return self.tokens.chat_prompt(messages, lead)

    def markup(self, text: str) -> list[int]:
        return self.tokens.markup(text)

    # calls
    def _sampling_params(self, call: Call) -> Any:
        kwargs = sampling_kwargs(call)
        key = json.dumps(kwargs, sort_keys=True)
        params = self._params.get(key)
        if params is None:
            if len(self._params) >= PARAMS_CACHE_SIZE:
                self._params.clear()
            params = self._params[key] = make_sampling_params(kwargs, self._vllm)
        return params

    def run(self, calls: Sequence[Call]) -> tuple[list[Any], float]:
        """One `LLM.generate` over all calls; returns the RequestOutputs (in call order) and the seconds it took.

        The lock serialises shards of one worker process (vllm.LLM is not thread-safe); waiting for it is not
        counted.
        """
        if not calls:
            return [], 0.0
        prompts = prompt_inputs(calls)
        params = [self._sampling_params(call) for call in calls]
        with self.lock:
            started = time.perf_counter()
            outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
            seconds = time.perf_counter() - started
        return list(outputs), seconds


def special_prefix(with_special: Sequence[int], plain: Sequence[int]) -> list[int]:
    """The tokens `encode(add_special_tokens=True)` puts before the text's own tokens (a trailing EOS is ignored)."""
    with_special, plain = list(with_special), list(plain)
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def merge_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Fold the system message into the first user message, for chat templates without a system role."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system and rest:
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


def plain_chat(messages: list[dict[str, str]]) -> str:
    """The chat messages as plain text, for a base model without a chat template."""
    body = "\n\n".join(m["content"] for m in messages)
    return f"{body}\n\nAnswer (one JSON object):\n"


_RUNTIMES: dict[tuple[Any, ...], VllmRuntime] = {}
_RUNTIMES_LOCK = threading.Lock()


def runtime_key(spec: VllmSpec) -> tuple[Any, ...]:
    """What the loaded LLM depends on (prices, token budgets and candidate counts do not)."""
    return (
        spec.model,
        spec.dtype,
        spec.max_model_len,
        spec.gpu_memory_utilization,
        spec.tensor_parallel_size,
        spec.quantization,
        spec.lora_path,
        spec.seed,
        spec.enable_prefix_caching,
        spec.vision.max_pages if spec.vision is not None else None,
    )


def shared_runtime(spec: VllmSpec) -> VllmRuntime:
    """Return this process's runtime for the spec's model, loading it on first use (never per shard)."""
    key = runtime_key(spec)
    with _RUNTIMES_LOCK:
        runtime = _RUNTIMES.get(key)
        if runtime is None:
            runtime = _RUNTIMES[key] = VllmRuntime(spec)
        return runtime


# ----------------------------------------------------------------------------------------------------------
# reading outputs


def next_token_reads(output: Any, token_ids: Sequence[int]) -> dict[int, float]:
    """The log-probabilities of `token_ids` at the first generated position of a RequestOutput."""
    completions = getattr(output, "outputs", None) or ()
    positions = getattr(completions[0], "logprobs", None) if completions else None
    if not positions:
        raise ValueError("vLLM returned no log-probabilities for a scoring request")
    return read_ids(positions[0], token_ids)


def generated_tokens(output: Any) -> tuple[list[int], list[float]]:
    """The generated token ids and each one's own log-probability (vLLM lists it whatever else it returns)."""
    completions = getattr(output, "outputs", None) or ()
    if not completions:
        return [], []
    ids = [int(t) for t in completions[0].token_ids]
    positions = getattr(completions[0], "logprobs", None) or []
    logprobs = []
    for i, token in enumerate(ids):
        entry = positions[i].get(token) if i < len(positions) and positions[i] is not None else None
        logprobs.append(float(getattr(entry, "logprob", entry)) if entry is not None else float("nan"))
    return ids, logprobs


@dataclass
class ScoreJob:
    """Calls that score continuations after one prompt, and how to sum their answers."""

    prompt_len: int
    continuations: list[list[int]]
    plan: TriePlan | None
    first: int = 0
    count: int = 0


def score_calls(
    prompt: Sequence[int], continuations: list[list[int]], *, token_ids: bool, images: DocPages | None = None
) -> tuple[ScoreJob, list[Call]]:
    """The calls scoring each continuation after `prompt`: trie reads, or one prompt-scoring call each."""
    base = tuple(prompt)
    if token_ids:
        plan = trie_plan(continuations)
        calls = [
            Call(base, path, read_ids=ids, images=images) for path, ids in zip(plan.paths, plan.reads, strict=True)
        ]
        return ScoreJob(len(base), continuations, plan), calls
    calls = [Call(base, tuple(c), prompt_scoring=True, images=images) for c in continuations]
    return ScoreJob(len(base), continuations, None), calls


def job_scores(job: ScoreJob, outputs: Sequence[Any]) -> np.ndarray:
    """Sum log-probabilities per continuation from the job's outputs (`outputs` holds exactly the job's)."""
    if job.plan is not None:
        reads = [next_token_reads(out, ids) for out, ids in zip(outputs, job.plan.reads, strict=True)]
        return trie_scores(job.plan, reads)
    scores = []
    for out, continuation in zip(outputs, job.continuations, strict=True):
        prompt_logprobs = getattr(out, "prompt_logprobs", None)
        if not prompt_logprobs:
            raise ValueError("vLLM returned no prompt log-probabilities for a scoring request")
        scores.append(prompt_logprob_score(prompt_logprobs, job.prompt_len, continuation))
    return np.asarray(scores, dtype=np.float64)


def parse_generation(
    task: TaskSpec, output: Any, decode: Callable[[Sequence[int]], str]
) -> tuple[dict[str, Any], dict[str, float | None]]:
    """Typed field values and confidences from one structured-generation output.

    Confidence of a value = exp(sum of log-probabilities of the generated tokens overlapping it). An answer that
    does not parse (cut off at max_output_tokens, say) gives None values with confidence 0.0, so the router
    escalates those fields rather than the engine failing the whole document.
    """
    assert task.extract is not None
    keys = [f.name for f in task.extract.fields]
    ids, logprobs = generated_tokens(output)
    pieces = token_pieces(decode, ids)
    content = "".join(pieces) if pieces is not None else decode(ids)
    try:
        _, values = parse_answer(task, content)
    except AnswerError:
        return dict.fromkeys(keys), dict.fromkeys(keys, 0.0)
    if pieces is None or any(np.isnan(lp) for lp in logprobs):
        confidences: dict[str, float | None] = dict.fromkeys(keys)
    else:
        confidences = value_confidences(content, list(zip(pieces, logprobs, strict=True)), keys)
    return values, confidences


def retryable(exc: BaseException) -> bool:
    """Whether trying again later may help: not for a request vLLM rejects (VLLMClientError) or a bad input."""
    rejected = any(cls.__name__ == "VLLMClientError" for cls in type(exc).__mro__)
    return not (rejected or isinstance(exc, ValueError))


# ----------------------------------------------------------------------------------------------------------
# the engine


@dataclass
class _FieldJob:
    field: FieldSpec
    job: ScoreJob
    values: list[Any]
    starts: list[int]
    prior_indices: list[int] | None


@dataclass
class _DocPlan:
    """Everything one document asks: its calls are calls[first:first + count] of the shard, and every index
    its jobs hold (ScoreJob.first, generate_call) counts from `first`."""

    truncated: bool = False
    label_job: ScoreJob | None = None
    field_jobs: list[_FieldJob] = field(default_factory=list)
    fixed: dict[str, tuple[Any, float | None]] = field(default_factory=dict)
    generate_task: TaskSpec | None = None
    generate_call: int = -1
    first: int = 0
    count: int = 0
    error: str | None = None


class VllmEngine:
    """Engine protocol implementation over a shared per-process vLLM runtime."""

    def __init__(
        self,
        spec: VllmSpec,
        task: TaskSpec,
        *,
        examples: Sequence[tuple[str, str]] = (),
        runtime: Runtime | None = None,
    ) -> None:
        self.spec = spec
        self.task = task
        lora = f"+{Path(spec.lora_path).name}" if spec.lora_path else ""
        self.name = f"vllm:{spec.model_name}{lora}"
        self.classifier_choice: Any = None  # engines/classify_choice.ClassifierChoice, set by build_small_engine
        self._runtime: Runtime = runtime or shared_runtime(spec)
        self.scoring = "token_ids" if self._runtime.supports_token_ids else "prompt_logprobs"
        self._family = family_of(spec.vision) if spec.vision is not None else None
        self._vision_runtime: VisionRuntime | None = None
        if spec.vision is not None:
            if not callable(getattr(self._runtime, "markup", None)):
                raise EngineUnavailableError("small_model.vision is set but this vLLM runtime cannot show page images")
            self._vision_runtime = cast("VisionRuntime", self._runtime)
        self._leads: dict[int, list[int]] = {}  # image placeholder tokens by page count
        self.strategy = "label_scoring"
        self._examples = list(examples)
        self._ctx = self._runtime.max_model_len
        self._bos = self._runtime.bos()
        self._marker = self._runtime.encode(fewshot.TRUNCATION_MARKER)
        self.few_shot_used = 0
        self.examples_used = 0
        self._label_prior: np.ndarray | None = None
        self._choice_rows: dict[str, tuple[dict[str, int], np.ndarray]] = {}
        if task.classify is not None:
            self._prepare_classification()
        if task.extract is not None:
            self._prepare_extraction(task.extract)
        if spec.calibration != "none":
            self._calibrate()

    # ------------------------------------------------------------------ set-up
    def _prepare_classification(self) -> None:
        classify = self.task.classify
        assert classify is not None
        self._label_tokens = [self._runtime.encode(fewshot.label_continuation(lb.text)) for lb in classify.labels]
        self._question = self._runtime.encode(fewshot.CLASSIFY_QUESTION)
        longest = max(len(t) for t in self._label_tokens)
        budget = self._ctx - min(self.spec.max_input_tokens, self._ctx // 2) - longest - QUESTION_RESERVE
        shots = fewshot.select_examples(classify, self._examples, self.spec.few_shot)
        while True:  # drop shots until the fixed prompt leaves room for documents
            self._classify_prefix = self._bos + self._runtime.encode(fewshot.classify_prefix(self.task, shots))
            if len(self._classify_prefix) <= budget or not shots:
                break
            shots = shots[: len(shots) * 3 // 4]
        self.few_shot_used = len(shots)
        self._classify_reserve = len(self._classify_prefix) + QUESTION_RESERVE + longest + 1
        self._classify_budget = self._document_budget(self._classify_reserve)

    def _prepare_extraction(self, extract: ExtractSpec) -> None:
        self._candidate_room = min(MAX_CANDIDATE_TOKENS, self._ctx // 8)
        budget = self._ctx - min(self.spec.max_input_tokens, self._ctx // 2) - self._candidate_room
        budget -= QUESTION_RESERVE
        examples = list(extract.examples)
        while True:  # drop worked examples from the end until the fixed prompt leaves room for documents
            trimmed = extract.model_copy(update={"examples": examples})
            self._extract_prefix = self._bos + self._runtime.encode(fewshot.extract_prefix(self.task, trimmed))
            if len(self._extract_prefix) <= budget or not examples:
                break
            examples = examples[:-1]
        self.examples_used = len(examples)
        self._field_questions = {f.name: self._runtime.encode(fewshot.extract_question(f)) for f in extract.fields}
        self._endings = {}
        for position, spec_field in enumerate(extract.fields):
            following = extract.fields[position + 1] if position + 1 < len(extract.fields) else None
            self._endings[spec_field.name] = fewshot.extract_question(following) if following else "\nDocument:"
        reserve = len(self._extract_prefix) + QUESTION_RESERVE + self._candidate_room + 1
        # a document may need JSON generation too: the chat prompt around it and the answer must fit as well
        empty_chat = len(self._runtime.chat_prompt(chat_messages(self.task.model_copy(update={"classify": None}), "")))
        reserve = max(reserve, empty_chat + self.spec.max_output_tokens + QUESTION_RESERVE)
        self._extract_reserve = reserve
        self._extract_budget = self._document_budget(reserve)

    def _document_budget(self, reserve: int) -> int:
        room = self._ctx - reserve
        if room < 64:
            raise EngineUnavailableError(
                f"the prompt's fixed part leaves no room for documents in a {self._ctx}-token context "
                f"(about {reserve} tokens are fixed); raise small_model.max_model_len, or shorten the "
                "instructions and examples"
            )
        return min(self.spec.max_input_tokens, room)

    def _calibrate(self) -> None:
        """Score content-free inputs once per engine: the label prior and the enum/bool choice priors."""
        jobs: list[tuple[str, ScoreJob]] = []
        calls: list[Call] = []

        def add(kind: str, prompt: list[int], continuations: list[list[int]]) -> None:
            job, job_calls = score_calls(prompt, continuations, token_ids=self.scoring == "token_ids")
            job.first, job.count = len(calls), len(job_calls)
            jobs.append((kind, job))
            calls.extend(job_calls)

        if self.task.classify is not None:
            for text in CONTENT_FREE_INPUTS:
                doc = self._runtime.encode(fewshot.classify_document(text))
                add("label", self._classify_prefix + doc + self._question, self._label_tokens)
        choice_surfaces: dict[str, list[str]] = {}
        if self.task.extract is not None:
            for spec_field in self.task.extract.fields:
                if spec_field.type not in ("enum", "bool"):
                    continue
                surfaces = list(spec_field.values or []) if spec_field.type == "enum" else ["yes", "no"]
                if not spec_field.required:
                    surfaces.append(fewshot.NO_VALUE)
                choice_surfaces[spec_field.name] = surfaces
                continuations = [self._continuation(spec_field, s) for s in surfaces]
                for text in CONTENT_FREE_INPUTS:
                    doc = self._runtime.encode(fewshot.extract_document(text))
                    prompt = self._extract_prefix + doc + self._field_questions[spec_field.name]
                    add(spec_field.name, prompt, continuations)
        if not calls:
            return
        key = hashlib.sha256(repr([(*c.prompt, -1, *c.read_ids) for c in calls]).encode()).hexdigest()
        memo: dict[str, Any] = getattr(self._runtime, "memo", {})
        rows = memo.get(key)
        if rows is None:
            outputs, _ = self._runtime.run(calls)
            rows = [job_scores(job, outputs[job.first : job.first + job.count]) for _, job in jobs]
            memo[key] = rows
        by_kind: dict[str, list[np.ndarray]] = {}
        for (kind, job), row in zip(jobs, rows, strict=True):
            by_kind.setdefault(kind, []).append(row if kind == "label" else self._per_token(row, job.continuations))
        if "label" in by_kind:
            self._label_prior = mean_softmax(by_kind.pop("label"))
        for name, field_rows in by_kind.items():
            self._choice_rows[name] = ({s: i for i, s in enumerate(choice_surfaces[name])}, np.asarray(field_rows))

    def _continuation(self, spec_field: FieldSpec, surface: str) -> list[int]:
        return self._runtime.encode(fewshot.value_continuation(surface) + self._endings[spec_field.name])

    def _per_token(self, scores: np.ndarray, continuations: Sequence[Sequence[int]]) -> np.ndarray:
        """Candidate scores as the llama.cpp engine ranks them: summed, or per token with candidate_scoring=mean."""
        if self.spec.candidate_scoring == "mean":
            return scores / np.array([len(c) for c in continuations], dtype=np.float64)
        return scores

    # ------------------------------------------------------------------ planning (pure given the tokenizer)
    def _visible(self, text: str, budget: int) -> tuple[str, bool]:
        """The document text the model sees: head and tail kept around a marker when it is too long."""
        tokens = self._runtime.encode(text)
        kept, truncated = truncate_tokens(tokens, budget, self._marker)
        return (self._runtime.decode(kept) if truncated else text), truncated

    def _lead(self, pages: DocPages | None) -> list[int]:
        """The image placeholder tokens put before a document's text (none on the text path)."""
        if pages is None:
            return []
        assert self._family is not None and self._vision_runtime is not None
        lead = self._leads.get(pages.count)
        if lead is None:
            lead = self._leads[pages.count] = self._vision_runtime.markup(page_markup(self._family, pages.count))
        return lead

    def _text_budget(self, budget: int, reserve: int, pages: DocPages | None, lead: Sequence[int]) -> int:
        """The document's text budget, less what its page images take of the context."""
        if pages is None:
            return budget
        room = self._ctx - reserve - pages.tokens - len(lead)
        if room < MIN_VISION_TEXT_TOKENS:
            raise ValueError(
                f"its {pages.count} page image(s) take about {pages.tokens} of the {self._ctx}-token context, "
                "leaving no room for its text; lower small_model.vision.max_pixels or max_pages, or raise "
                "max_model_len"
            )
        return min(budget, room)

    def _shown(self, visible: str, pages: DocPages | None) -> str:
        """The text the prompt shows beside page images (all of it on the text path)."""
        if pages is None or self.spec.vision is None or self.spec.vision.ocr_text:
            return visible
        return ""

    def plan(self, batch: Sequence[Request]) -> tuple[list[_DocPlan], list[Call]]:
        """Every call the shard needs, grouped per document, the documents' calls contiguous and in order."""
        plans: list[_DocPlan] = []
        calls: list[Call] = []
        token_ids = self.scoring == "token_ids"
        for request in batch:
            plan = _DocPlan(first=len(calls))
            own: list[Call] = []
            try:
                pages = doc_pages(request.page_images, self.spec.vision)
                if self.task.classify is not None:
                    self._plan_classification(request.text, plan, own, token_ids, pages=pages)
                if self.task.extract is not None:
                    self._plan_extraction(request.text, self.task.extract, plan, own, token_ids, pages=pages)
            except (ValueError, RuntimeError) as exc:  # this document cannot be asked; the others still are
                plan = _DocPlan(first=len(calls), error=f"small model failed on this document: {exc}")
                own = []
            calls.extend(own)
            plan.count = len(own)
            plans.append(plan)
        return plans, calls

    def _plan_classification(
        self, text: str, plan: _DocPlan, calls: list[Call], token_ids: bool, *, pages: DocPages | None = None
    ) -> None:
        lead = self._lead(pages)
        budget = self._text_budget(self._classify_budget, self._classify_reserve, pages, lead)
        visible, truncated = self._visible(text, budget)
        doc = self._runtime.encode(fewshot.classify_document(self._shown(visible, pages)))
        room = self._ctx - len(self._classify_prefix) - len(self._question) - max(map(len, self._label_tokens)) - 1
        room -= len(lead) + (pages.tokens if pages is not None else 0)
        if len(doc) > room:  # the wrapper added more than the reserve allows for: cut its end
            doc, truncated = doc[: max(room, 0)], True
        plan.truncated |= truncated
        prompt = self._classify_prefix + lead + doc + self._question
        job, job_calls = score_calls(prompt, self._label_tokens, token_ids=token_ids, images=pages)
        job.first, job.count = len(calls), len(job_calls)
        plan.label_job = job
        calls.extend(job_calls)

    def _plan_extraction(
        self,
        text: str,
        extract: ExtractSpec,
        plan: _DocPlan,
        calls: list[Call],
        token_ids: bool,
        *,
        pages: DocPages | None = None,
    ) -> None:
        lead = self._lead(pages)
        budget = self._text_budget(self._extract_budget, self._extract_reserve, pages, lead)
        visible, truncated = self._visible(text, budget)
        shown = self._shown(visible, pages)
        doc = self._runtime.encode(fewshot.extract_document(shown))
        longest_question = max(map(len, self._field_questions.values()))
        room = self._ctx - len(self._extract_prefix) - longest_question - self._candidate_room - 1
        room -= len(lead) + (pages.tokens if pages is not None else 0)
        if len(doc) > room:  # the wrapper added more than the reserve allows for: cut its end
            doc, truncated = doc[: max(room, 0)], True
        plan.truncated |= truncated
        doc = lead + doc
        generate: list[FieldSpec] = []
        for spec_field in extract.fields:
            if self.spec.extract_strategy == "generate":
                generate.append(spec_field)
                continue
            candidates = candidates_for(spec_field, visible, limit=self.spec.max_candidates)
            mentioned = [c for c in candidates if c.start >= 0]
            if spec_field.type == "enum" and mentioned:
                candidates = mentioned  # values the document names beat values it never mentions
            if not candidates:
                generate.append(spec_field)  # nothing to choose from: let the model write the value
                continue
            surfaces = [c.surface for c in candidates]
            values: list[Any] = [c.value for c in candidates]
            starts = [c.start for c in candidates]
            if not spec_field.required:
                surfaces.append(fewshot.NO_VALUE)
                values.append(None)
                starts.append(-1)
            continuations = [self._continuation(spec_field, s) for s in surfaces]
            keep = [i for i, c in enumerate(continuations) if len(c) <= self._candidate_room]
            if len(keep) < len(continuations):
                surfaces = [surfaces[i] for i in keep]
                values = [values[i] for i in keep]
                starts = [starts[i] for i in keep]
                continuations = [continuations[i] for i in keep]
            if not continuations:
                plan.fixed[spec_field.name] = (None, 0.0)
                continue
            prompt = self._extract_prefix + doc + self._field_questions[spec_field.name]
            job, job_calls = score_calls(prompt, continuations, token_ids=token_ids, images=pages)
            job.first, job.count = len(calls), len(job_calls)
            calls.extend(job_calls)
            prior_indices = None
            if spec_field.name in self._choice_rows:
                index = self._choice_rows[spec_field.name][0]
                if all(s in index for s in surfaces):
                    prior_indices = [index[s] for s in surfaces]
            plan.field_jobs.append(_FieldJob(spec_field, job, values, starts, prior_indices))
        if generate:
            sub_extract = extract.model_copy(update={"fields": generate})
            sub_task = self.task.model_copy(update={"classify": None, "extract": sub_extract})
            messages = chat_messages(sub_task, shown)
            if pages is None:
                prompt = self._runtime.chat_prompt(messages)
            else:
                assert self._family is not None and self._vision_runtime is not None
                prompt = self._vision_runtime.chat_prompt(messages, page_markup(self._family, pages.count))
            schema = json.dumps(answer_schema(sub_task), sort_keys=True)
            plan.generate_task = sub_task
            plan.generate_call = len(calls)
            calls.append(Call(tuple(prompt), schema=schema, max_tokens=self.spec.max_output_tokens, images=pages))

    # ------------------------------------------------------------------ reading answers
    def _label_probs(self, plan: _DocPlan, outputs: Sequence[Any]) -> np.ndarray:
        job = plan.label_job
        assert job is not None
        return softmax(job_scores(job, outputs[job.first : job.first + job.count]))

    def _fields(self, plan: _DocPlan, outputs: Sequence[Any]) -> tuple[dict[str, Any], dict[str, float | None]]:
        extract = self.task.extract
        assert extract is not None
        values: dict[str, Any] = {}
        confidences: dict[str, float | None] = {}
        for name, (value, confidence) in plan.fixed.items():
            values[name], confidences[name] = value, confidence
        for fj in plan.field_jobs:
            job = fj.job
            scores = job_scores(job, outputs[job.first : job.first + job.count])
            prior = None
            if fj.prior_indices is not None:
                prior = mean_softmax(self._choice_rows[fj.field.name][1], fj.prior_indices)
            lengths = [len(c) for c in job.continuations] if self.spec.candidate_scoring == "mean" else None
            probs = choice_probabilities(scores, prior=prior, lengths=lengths)
            values[fj.field.name], confidences[fj.field.name] = choose_value(fj.field, probs, fj.values, fj.starts)
        if plan.generate_task is not None:
            generated, generated_confidences = parse_generation(
                plan.generate_task, outputs[plan.generate_call], self._runtime.decode
            )
            values.update(generated)
            confidences.update(generated_confidences)
        ordered = [f.name for f in extract.fields]
        return {n: values.get(n) for n in ordered}, {n: confidences.get(n) for n in ordered}

    # ------------------------------------------------------------------ protocol
    def predict(self, batch: Sequence[Request]) -> list[Prediction]:
        if not batch:
            return []
        plans, calls = self.plan(batch)
        try:
            outputs, seconds = self._run(calls)
            results: list[tuple[list[Any], float] | Exception] = []
            weights = [self._weight(outputs[p.first : p.first + p.count]) for p in plans]
            shares = apportion(seconds, weights)
            for plan, share in zip(plans, shares, strict=True):
                results.append((outputs[plan.first : plan.first + plan.count], share))
        except Exception:  # isolate the document that broke the shard's call
            results = [self._run_alone(calls[p.first : p.first + p.count]) for p in plans]
        return self._assemble(batch, plans, results)

    def _run(self, calls: Sequence[Call]) -> tuple[list[Any], float]:
        """One runtime call for the shard; on the vision path, one per `documents_per_call` documents with pages,
        so only their page images are decoded and in memory at a time."""
        if self.spec.vision is None:
            return self._runtime.run(calls)
        outputs: list[Any] = []
        seconds = 0.0
        for start, end in call_groups([c.images for c in calls], self.spec.vision.documents_per_call):
            part, part_seconds = self._runtime.run(calls[start:end])
            outputs.extend(part)
            seconds += part_seconds
        return outputs, seconds

    def _run_alone(self, calls: Sequence[Call]) -> tuple[list[Any], float] | Exception:
        try:
            return self._run(calls)
        except Exception as exc:  # becomes this document's error row
            return exc

    @staticmethod
    def _weight(outputs: Sequence[Any]) -> float:
        return float(sum(request_usage(out).computed for out in outputs))

    def _assemble(
        self,
        batch: Sequence[Request],
        plans: Sequence[_DocPlan],
        results: Sequence[tuple[list[Any], float] | Exception],
    ) -> list[Prediction]:
        classify = self.task.classify
        label_probs: list[np.ndarray | None] = []
        for plan, result in zip(plans, results, strict=True):
            probs = None
            if classify is not None and plan.error is None and not isinstance(result, Exception):
                try:
                    probs = self._label_probs(plan, result[0])
                except ValueError:
                    probs = None
            label_probs.append(probs)
        prior = self._label_prior
        if self.spec.calibration == "batch":
            good = [p for p in label_probs if p is not None]
            prior = np.mean(good, axis=0) if len(good) >= BATCH_CALIBRATION_MIN else self._label_prior
        predictions = []
        for request, plan, result, probs in zip(batch, plans, results, label_probs, strict=True):
            prediction = Prediction(id=request.id, model=self.name, truncated=plan.truncated)
            if plan.error is not None:
                prediction.error = plan.error
                predictions.append(prediction)
                continue
            if isinstance(result, Exception):
                prediction.error = f"small model failed on this document: {result}"
                prediction.retryable = retryable(result)
                predictions.append(prediction)
                continue
            outputs, seconds = result
            prediction.usage = total_usage([request_usage(out) for out in outputs])
            prediction.engine_seconds = seconds
            try:
                if classify is not None:
                    if probs is None:
                        raise ValueError("vLLM returned no label scores")
                    calibrated = contextual_calibration(probs, prior) if prior is not None else probs
                    index, confidence = pick(calibrated)
                    prediction.label, prediction.label_confidence = classify.labels[index].name, confidence
                if self.task.extract is not None:
                    prediction.fields, prediction.field_confidences = self._fields(plan, outputs)
            except (ValueError, RuntimeError) as exc:
                prediction.error = f"small model failed on this document: {exc}"
            predictions.append(prediction)
        return check_complete(batch, predictions, self.name)

    def close(self) -> None:
        """Keep the shared runtime loaded: other shards in this worker process reuse it."""


__all__ = [
    "INSTALL_HINT",
    "NO_GPU_MESSAGE",
    "Call",
    "VllmEngine",
    "VllmRuntime",
    "import_vllm",
    "llm_kwargs",
    "make_sampling_params",
    "require_gpu",
    "sampling_kwargs",
    "shared_runtime",
]
