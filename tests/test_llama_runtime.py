"""The llama.cpp runtime against the real Gemma 3 270M: trie scoring equals plain decoding, caching changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from docroute.engines.local.llama_runtime import _build_trie, log_softmax_at


def _reference_scores(runtime, prompt: list[int], continuations: list[list[int]]) -> np.ndarray:
    """Score each continuation the slow way: decode prompt + continuation as one sequence, read every position."""
    scores = []
    for continuation in continuations:
        runtime._reset()
        full = prompt + continuation
        runtime._decode([(t, i, (0,), True) for i, t in enumerate(full[:-1])])
        total = 0.0
        for j, token in enumerate(continuation):
            total += float(log_softmax_at(runtime._logits(len(prompt) - 1 + j), [token])[0])
        scores.append(total)
    runtime._reset()
    return np.array(scores)


def test_trie_merges_shared_prefixes() -> None:
    nodes = _build_trie([[1, 2, 3], [1, 2, 4], [5]])
    assert [n.token for n in nodes] == [1, 5, 2, 3, 4]
    assert nodes[0].sequences == [0, 1]
    assert nodes[2].depth == 1


def test_scores_match_sequential_decoding(runtime) -> None:
    prompt = runtime.tokenize("Topic of the article: the striker scored twice in the cup final.\nTopic:", add_bos=True)
    labels = [" sports\n", " sport\n", " sports news\n", " business\n", " politics\n"]
    continuations = [runtime.tokenize(label) for label in labels]
    fast = runtime.score([prompt], continuations)
    slow = _reference_scores(runtime, prompt, continuations)
    # llama.cpp's CPU kernels round differently for different batch shapes: a few hundredths of a nat
    assert np.allclose(fast, slow, atol=0.25)
    assert labels[int(np.argmax(fast))] == labels[int(np.argmax(slow))]
    assert np.all(fast < 0)


def test_segment_cache_keeps_scores_identical(runtime) -> None:
    head = runtime.tokenize("Classify news articles.\n\n", add_bos=True)
    question = runtime.tokenize("\nTopic:")
    labels = [runtime.tokenize(t) for t in (" sports\n", " business\n", " weather\n")]
    doc_a = runtime.tokenize("Article: " + "Shares rallied after strong earnings. " * 30)
    doc_b = runtime.tokenize("Article: " + "Heavy rain is expected over the weekend. " * 30)
    runtime._reset()
    fresh = runtime.score([head, doc_b, question], labels)
    runtime.score([head, doc_a, question], labels)  # fill the cache with another document first
    cached = runtime.score([head, doc_b, question], labels)
    assert np.array_equal(fresh, cached)
    assert int(np.argmax(cached)) == 2  # weather


def test_many_continuations_are_grouped_to_fit(runtime) -> None:
    prompt = runtime.tokenize("Pick a number:", add_bos=True)
    continuations = [runtime.tokenize(f" {i} apples and {i + 1} pears\n") for i in range(300)]
    scores = runtime.score([prompt], continuations)
    assert scores.shape == (300,) and np.isfinite(scores).all()


def test_embeddings_are_normalised_and_meaningful(runtime) -> None:
    vectors, counts = runtime.embed(
        ["My card has not arrived yet", "When will my new card be delivered?", "The football match ended 2-1"]
    )
    assert vectors.shape == (3, runtime.n_embd)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    assert all(c > 3 for c in counts)


def test_prompt_too_long_is_a_clear_error(runtime) -> None:
    prompt = runtime.tokenize("word " * 5000, add_bos=True)
    with pytest.raises(ValueError, match="does not fit"):
        runtime.score([prompt], [[1]])
