"""Tests for schemas/errors.py: every public docroute exception derives from DocrouteError and keeps its old base."""

from __future__ import annotations

from pathlib import Path

import pytest

from docroute.engines.base import EngineError, EngineUnavailableError, ExchangeRefusedError
from docroute.engines.extract.ranker import RankerMismatchError, RankerTrainingError
from docroute.engines.local.remote_encoders import EmbeddingsRequestError, EmbeddingsResponseError
from docroute.engines.remote.client_base import CutShortError, FinalAnswerError, SlotUnavailableError
from docroute.engines.scoring.prompts import AnswerError
from docroute.flows.runners import RunnerUnavailableError
from docroute.schemas.candidates import CandidatesFileError
from docroute.schemas.errors import DocrouteError, ExitCode, InputError, SourceError, StateError, StorageError
from docroute.schemas.load import JobSpecError, load_job
from docroute.schemas.pricing import UnknownModelPriceError, lookup_price
from docroute.schemas.values import ValueCoercionError
from docroute.tasks.ingest.discover import SourceNotFoundError, SourceUnavailableError
from docroute.tasks.ingest.examples import ExamplesFileError
from docroute.tasks.ingest.labels import LabelsFileError
from docroute.tasks.learn.training import TrainingDataError
from docroute.tasks.model.heads import HeadMissingError
from docroute.tasks.model.infer import ConcurrencyLimitMissingError
from docroute.tasks.store.lease import LeaseLostError, RunInProgressError
from docroute.tasks.store.write import OutputWriteError

# (class, the docroute base it now has, the base it had before and must keep)
HIERARCHY: list[tuple[type[Exception], type[DocrouteError], type[Exception]]] = [
    (EngineError, DocrouteError, Exception),
    (ExchangeRefusedError, DocrouteError, EngineError),
    (EngineUnavailableError, DocrouteError, EngineError),
    (SlotUnavailableError, DocrouteError, EngineError),
    (EmbeddingsRequestError, DocrouteError, EngineError),
    (EmbeddingsResponseError, DocrouteError, EngineError),
    (FinalAnswerError, DocrouteError, Exception),
    (AnswerError, DocrouteError, ValueError),
    (CutShortError, DocrouteError, AnswerError),
    (RankerMismatchError, DocrouteError, ValueError),
    (RankerTrainingError, InputError, ValueError),
    (ValueCoercionError, DocrouteError, ValueError),
    (ConcurrencyLimitMissingError, DocrouteError, RuntimeError),
    (RunnerUnavailableError, DocrouteError, RuntimeError),
    (JobSpecError, InputError, ValueError),
    (CandidatesFileError, InputError, ValueError),
    (ExamplesFileError, InputError, ValueError),
    (LabelsFileError, InputError, ValueError),
    (TrainingDataError, InputError, ValueError),
    (UnknownModelPriceError, InputError, KeyError),
    (HeadMissingError, StateError, FileNotFoundError),
    (RunInProgressError, StateError, RuntimeError),
    (LeaseLostError, StateError, RuntimeError),
    (SourceNotFoundError, SourceError, FileNotFoundError),
    (SourceUnavailableError, SourceError, OSError),
    (OutputWriteError, StorageError, OSError),
]


def test_intermediate_bases() -> None:
    assert issubclass(DocrouteError, Exception)
    assert InputError.__bases__ == (DocrouteError,)
    assert StateError.__bases__ == (DocrouteError,)
    assert not issubclass(InputError, StateError) and not issubclass(StateError, InputError)


@pytest.mark.parametrize(("cls", "kind", "old_base"), HIERARCHY, ids=[c.__qualname__ for c, _, _ in HIERARCHY])
def test_every_error_is_a_docroute_error_and_keeps_its_old_base(
    cls: type[Exception], kind: type[DocrouteError], old_base: type[Exception]
) -> None:
    assert issubclass(cls, DocrouteError)
    assert issubclass(cls, kind)
    assert issubclass(cls, old_base)
    # the MRO is valid (the class statement ran) and ends in the built-in chain
    mro = cls.__mro__
    assert mro[0] is cls and mro[-1] is object
    assert mro.index(DocrouteError) < mro.index(Exception)
    assert mro.index(old_base) <= mro.index(Exception)


def test_only_one_kind_per_error() -> None:
    """An error is user input, output state, the source or the storage: never two of them (one exit code)."""
    for cls, _, _ in HIERARCHY:
        assert sum(issubclass(cls, kind) for kind in (InputError, StateError, SourceError, StorageError)) <= 1, cls


def test_transient_engine_failures_say_try_again_later() -> None:
    assert ExchangeRefusedError.exit_code is SlotUnavailableError.exit_code is ExitCode.TEMPORARY
    assert EngineUnavailableError.exit_code is ExitCode.ENGINE  # a missing model stays missing


def test_messages_unchanged() -> None:
    # a plain subclass's text is its message, as before
    assert str(LeaseLostError("lease taken over")) == "lease taken over"
    missing = HeadMissingError("head abc is gone")
    assert str(missing) == "head abc is gone"
    assert isinstance(missing, OSError)
    # UnknownModelPriceError keeps its own text, not KeyError's quoted repr
    with pytest.raises(DocrouteError) as info:
        lookup_price("no-such-model")
    assert isinstance(info.value, KeyError)
    assert str(info.value).startswith("no price known for model 'no-such-model'")


def test_bad_job_file_is_caught_as_docroute_error_and_as_value_error(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(DocrouteError) as info:
        load_job(job)
    assert isinstance(info.value, JobSpecError)
    assert isinstance(info.value, InputError)
    with pytest.raises(ValueError):
        load_job(job)
    # the way a caller writes it: one clause for any docroute error
    try:
        load_job(job)
    except DocrouteError as exc:
        caught: Exception = exc
    assert str(caught)
