"""Pure maths and bookkeeping of the vLLM engine: no vLLM, no GPU, no I/O, so every step is testable on a laptop.

How a continuation is scored. log P(c_1..c_n | prompt) is the sum of n next-token log-probabilities. vLLM gives a
next-token log-probability for chosen ids through `SamplingParams.logprob_token_ids` (vLLM >= 0.21) on a one-token
generation request, and a generation request *reads* the prefix cache, so the shared prompt is computed once.
All continuations of one prompt form a trie; each inner node (the prompt followed by a path) becomes one request
that reads the log-probabilities of the node's children. This is what the llama.cpp runtime does with KV-cache
sequences, so both engines compute the same numbers.

`prompt_logprobs` (the fallback for older vLLM) gives the same sums from one request per continuation, but vLLM
never reads the prefix cache for a request that asks for prompt log-probabilities (`skip_reading_prefix_cache`
defaults to True for it), so every such request recomputes the whole prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from docroute.engines.base import Usage
from docroute.engines.scoring.confidence import softmax

MISSING_LOGPROB = -1e4
"""Log-probability used when vLLM did not report a requested token (should not happen; keeps the maths finite)."""


# ----------------------------------------------------------------------------------------------------------
# continuation tries


@dataclass(frozen=True, slots=True)
class TriePlan:
    """The next-token reads that score a set of continuations after one prompt.

    `paths[k]` is the token path from the prompt to inner node k (paths[0] is empty: the prompt itself) and
    `reads[k]` the ids whose log-probability is read there (the node's children, in first-seen order). `steps[j]`
    lists, for continuation j, the (node, token) pairs whose log-probabilities sum to its score.
    """

    paths: tuple[tuple[int, ...], ...]
    reads: tuple[tuple[int, ...], ...]
    steps: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def size(self) -> int:
        return len(self.paths)


def trie_plan(continuations: Sequence[Sequence[int]]) -> TriePlan:
    """Group continuations into a trie of next-token reads; shared beginnings are read once."""
    if any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    index: dict[tuple[int, ...], int] = {}
    paths: list[tuple[int, ...]] = []
    reads: list[list[int]] = []
    steps: list[tuple[tuple[int, int], ...]] = []
    if continuations:
        index[()] = 0
        paths.append(())
        reads.append([])
    for continuation in continuations:
        tokens = tuple(int(t) for t in continuation)
        walk: list[tuple[int, int]] = []
        for depth, token in enumerate(tokens):
            path = tokens[:depth]
            node = index.get(path)
            if node is None:
                node = index[path] = len(paths)
                paths.append(path)
                reads.append([])
            if token not in reads[node]:
                reads[node].append(token)
            walk.append((node, token))
        steps.append(tuple(walk))
    return TriePlan(tuple(paths), tuple(tuple(r) for r in reads), tuple(steps))


def logprob_of(entry: Any) -> float:
    """A log-probability from vLLM's `Logprob` (anything with `.logprob`) or from a plain number."""
    value = getattr(entry, "logprob", entry)
    return float(value)


def read_ids(position: Mapping[int, Any] | None, token_ids: Sequence[int]) -> dict[int, float]:
    """Pick the log-probabilities of `token_ids` from one position's {token id: Logprob} mapping."""
    found: dict[int, float] = {}
    for token in token_ids:
        entry = position.get(token) if position is not None else None
        found[token] = MISSING_LOGPROB if entry is None else logprob_of(entry)
    return found


def trie_scores(plan: TriePlan, node_reads: Sequence[Mapping[int, float]]) -> np.ndarray:
    """Sum each continuation's next-token log-probabilities from the reads made at the plan's nodes."""
    if len(node_reads) != plan.size:
        raise ValueError(f"{len(node_reads)} reads for a plan of {plan.size} nodes")
    scores = np.zeros(len(plan.steps), dtype=np.float64)
    for j, walk in enumerate(plan.steps):
        total = 0.0
        for node, token in walk:
            value = node_reads[node].get(token)
            total += MISSING_LOGPROB if value is None else float(value)
        scores[j] = total
    return scores


def prompt_logprob_score(
    prompt_logprobs: Sequence[Mapping[int, Any] | None], prompt_len: int, continuation: Sequence[int]
) -> float:
    """Sum the prompt log-probabilities of a continuation placed after `prompt_len` prompt tokens.

    `prompt_logprobs` is vLLM's `RequestOutput.prompt_logprobs` for the request `prompt + continuation`: one
    {token id: Logprob} per prompt position, None at position 0; with `prompt_logprobs=0` each mapping holds at
    least the actual prompt token.
    """
    if len(prompt_logprobs) < prompt_len + len(continuation):
        raise ValueError("prompt log-probabilities do not cover the continuation")
    total = 0.0
    for offset, token in enumerate(continuation):
        position = prompt_logprobs[prompt_len + offset]
        entry = position.get(int(token)) if position is not None else None
        total += MISSING_LOGPROB if entry is None else logprob_of(entry)
    return total


# ----------------------------------------------------------------------------------------------------------
# probabilities


def mean_softmax(
    score_rows: Sequence[Sequence[float]] | np.ndarray, indices: Sequence[int] | None = None
) -> np.ndarray:
    """The prior: the mean over content-free inputs of the softmax over (a subset of) the choices.

    A subset's softmax over the same scores equals what scoring only that subset gives, so one set of content-free
    scores serves every subset of an enum's values a document mentions.
    """
    rows = np.asarray(score_rows, dtype=np.float64)
    if indices is not None:
        rows = rows[:, list(indices)]
    return np.mean([softmax(row) for row in rows], axis=0)


# ----------------------------------------------------------------------------------------------------------
# tokens and text


def token_pieces(decode: Callable[[Sequence[int]], str], token_ids: Sequence[int]) -> list[str] | None:
    """Split `decode(token_ids)` into one text piece per token, or None when decoding does not grow by appending.

    Each piece is what decoding one more token adds; a token that ends inside a multi-byte character adds ""
    and the token that completes it adds the whole character. Decoding growing prefixes (rather than single
    tokens) keeps SentencePiece's leading-space rules and byte fallback exact. None (rare: a tokenizer that
    rewrites earlier text, e.g. clean-up of spaces) means per-token confidences cannot be located.
    """
    pieces: list[str] = []
    previous = ""
    for end in range(1, len(token_ids) + 1):
        text = decode(token_ids[:end])
        if text.endswith("\ufffd") and end < len(token_ids):
            pieces.append("")  # an incomplete character: a later token finishes it
            continue
        if not text.startswith(previous):
            return None
        pieces.append(text[len(previous) :])
        previous = text
    return pieces


# ----------------------------------------------------------------------------------------------------------
# accounting


@dataclass(frozen=True, slots=True)
class RequestUsage:
    """What one vLLM request consumed: prompt tokens, prompt tokens read from the prefix cache, generated tokens."""

    prompt_tokens: int
    cached_tokens: int
    output_tokens: int

    @property
    def computed(self) -> int:
        """Tokens the GPU actually ran (cached prompt tokens cost next to nothing)."""
        return max(self.prompt_tokens - self.cached_tokens, 0) + self.output_tokens


def request_usage(output: Any) -> RequestUsage:
    """Read token counts from a vLLM `RequestOutput` (duck-typed: prompt_token_ids, num_cached_tokens, outputs)."""
    prompt = len(getattr(output, "prompt_token_ids", None) or ())
    cached = int(getattr(output, "num_cached_tokens", None) or 0)
    outputs = getattr(output, "outputs", None) or ()
    generated = len(getattr(outputs[0], "token_ids", None) or ()) if outputs else 0
    return RequestUsage(prompt, min(cached, prompt), generated)


def total_usage(usages: Sequence[RequestUsage]) -> Usage:
    return Usage(
        input_tokens=sum(u.prompt_tokens for u in usages),
        output_tokens=sum(u.output_tokens for u in usages),
        cached_tokens=sum(u.cached_tokens for u in usages),
    )


def apportion(seconds: float, weights: Sequence[float]) -> list[float]:
    """Split one call's wall time over documents in proportion to their weights (equally when all are zero)."""
    if not weights:
        return []
    total = float(sum(weights))
    if total <= 0:
        return [seconds / len(weights)] * len(weights)
    return [seconds * float(w) / total for w in weights]
