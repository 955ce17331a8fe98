"""Encoders for the classification head: the bundled WordLlama encoder offline, and heads kept to their encoder."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import numpy as np
import pytest

from docroute.engines.local import encoders
from docroute.engines.local.encoders import WordLlamaEncoder, load_wordllama, wordllama_package_dir
from docroute.schemas.spec import JobSpec
from docroute.tasks.learn.embeddings import model_key


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every outgoing connection fail, so a loader that tries to download is caught, not just slow."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access during a test that must run offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_bundled_encoder_loads_and_embeds_without_network(monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    monkeypatch.setattr(encoders, "_WORDLLAMA", {})  # a real load from the wheel's files, not the process cache
    encoder = WordLlamaEncoder(max_tokens=768)
    assert encoder.name == "wordllama:l2_supercat_256" and encoder.dim == 256
    encoded = encoder.encode(["I lost my card", "", "Where is my new card?"])
    assert encoded.vectors.shape == (3, 256) and encoded.vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(encoded.vectors[[0, 2]], axis=1), 1.0, atol=1e-5)
    assert not encoded.vectors[1].any() and encoded.tokens[1] == 0  # an empty text: a zero row, no NaN
    assert load_wordllama() is load_wordllama()  # once per process


def test_similar_texts_are_closer_than_unrelated_ones() -> None:
    vectors = WordLlamaEncoder(max_tokens=768).embed(
        [
            "My card has not arrived yet.",
            "I am still waiting for my new card to be delivered.",
            "Simmer the tomato sauce with garlic for twenty minutes.",
        ]
    )
    similar, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert similar > unrelated + 0.2, (similar, unrelated)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Importing wordllama configures the root logger; put it back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_vectors_match_wordllama_inference_and_long_texts_are_cut(root_logging: None) -> None:
    from tokenizers import Tokenizer
    from wordllama.inference import WordLlamaInference

    texts = ["Can I top up by bank transfer?", "Why was I charged a fee for a cash withdrawal?"]
    tokenizer = Tokenizer.from_file(str(wordllama_package_dir() / "tokenizers/l2_supercat_tokenizer_config.json"))
    reference = WordLlamaInference(load_wordllama().table, tokenizer).embed(texts, norm=True)
    encoder = WordLlamaEncoder(max_tokens=64)
    assert np.allclose(encoder.embed(texts), reference, atol=1e-5)
    long = encoder.encode(["the fee " * 200, "the fee " * 8])
    assert long.tokens[0] > long.limit == 64 >= long.tokens[1]
    assert np.allclose(long.vectors[0], encoder.embed([" ".join(["the fee"] * 200)])[0])


def _job(encoder: str | None) -> JobSpec:
    small = {"engine": "llamacpp"} | ({"encoder": encoder} if encoder else {})
    return JobSpec.model_validate(
        {
            "name": "t",
            "source": {"url": "memory://docs"},
            "output": {"url": "memory://out"},
            "task": {"classify": {"labels": [{"name": "a"}, {"name": "b"}]}},
            "small_model": small,
        }
    )


def test_the_encoder_shapes_the_spec_hash_and_the_embedding_cache_key() -> None:
    unset, gemma, other = _job(None), _job("llamacpp"), _job("wordllama")
    assert unset.spec_hash() == _job(None).spec_hash()
    assert len({unset.spec_hash(), gemma.spec_hash(), other.spec_hash()}) == 3  # a named encoder is in the hash
    assert "encoder" not in unset.model_dump(mode="json")["small_model"]  # jobs that never name one keep theirs
    assert model_key("wordllama:l2_supercat_256", 768) != model_key("llamacpp:gemma-3-270m-q4_k_m.gguf", 768)
    assert model_key("wordllama:l2_supercat_256", 768) != model_key("wordllama:l2_supercat_256", 64)
    assert JobSpec.model_validate(other.model_dump(mode="json")).small_model.encoder == "wordllama"
