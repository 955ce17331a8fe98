"""Extraction by learned candidate rankers, whatever the small engine is, and when to use them.

A receipt's total or company is positional and lexical (the amount after "TOTAL", the upper-case first lines), which
a ranker over simple features learns from a few dozen worked examples, where a 270M base model's likelihood cannot:
on SROIE with 100 training receipts the ranker chooses company 92%, date 99%, address 82%, total 91% correctly at
~20 ms per receipt, against 53% / 100% / 0% / 40% for Gemma's likelihood at ~15 s (BENCHMARKS.md). So with enough
examples the rankers answer the fields and no language model is loaded for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from docroute.engines.base import Prediction, Request, check_complete
from docroute.engines.extract.ranker import ExtractionRanker, train_extraction_ranker
from docroute.schemas.spec import ExtractExample, ExtractSpec, SmallModelSpec

logger = logging.getLogger("docroute.extract")

MIN_RANKER_EXAMPLES = 20
"""Worked examples (inline plus examples_file) from which `extract_ranker: auto` trains rankers: with 30 SROIE
receipts they already reach 89% / 99% / 81% / 87% (company, date, address, total)."""


class ExtractMethod(StrEnum):
    """What answers a document's fields."""

    MODEL = "model"  # the generative small model (candidate likelihood, or JSON for a served model)
    RANKER = "ranker"  # learned candidate rankers, one per field


@dataclass(frozen=True)
class ExtractionChoice:
    method: ExtractMethod
    why: str


class RankerExtractor:
    """Engine protocol over an ExtractionRanker that has a ranker for every field of the task."""

    def __init__(self, extract: ExtractSpec, ranker: ExtractionRanker) -> None:
        missing = [field.name for field in extract.fields if field.name not in ranker.rankers]
        if missing:
            raise ValueError(f"no ranker for field(s) {', '.join(missing)}")
        self.extract = extract
        self.ranker = ranker
        self.name = "ranker"

    def predict(self, batch: Sequence[Request]) -> list[Prediction]:
        predictions = []
        for request in batch:
            started = time.perf_counter()
            prediction = Prediction(id=request.id, model=self.name)
            try:
                prediction.fields, prediction.field_confidences = self.ranker.extract(request.text, request.geometry)
            except (ValueError, RuntimeError) as exc:
                prediction.error = f"the extraction ranker failed on this document: {exc}"
            prediction.engine_seconds = time.perf_counter() - started
            predictions.append(prediction)
        return check_complete(batch, predictions, self.name)

    def close(self) -> None:
        """Nothing to release: the rankers are plain arrays."""


def plan_extraction(
    small: SmallModelSpec,
    extract: ExtractSpec,
    examples: Sequence[ExtractExample],
    ranker: ExtractionRanker | None = None,
) -> tuple[ExtractionChoice, ExtractionRanker | None]:
    """Rankers when `docroute train` promoted them or the job has enough worked examples; the model otherwise.

    Rankers are used only when every field has one: a field whose examples never contain its value among the
    document's candidates gets none, and then the model answers all fields rather than mixing two confidences.
    """
    if small.extract_ranker == "never":
        return ExtractionChoice(ExtractMethod.MODEL, "extract_ranker: never"), None
    if ranker is not None:
        why = f"rankers promoted by docroute train for {', '.join(ranker.rankers)}"
        return ExtractionChoice(ExtractMethod.RANKER, why), ranker
    if len(examples) < MIN_RANKER_EXAMPLES:
        why = f"{len(examples)} worked examples (rankers need {MIN_RANKER_EXAMPLES}): the {small.engine} model"
        return ExtractionChoice(ExtractMethod.MODEL, why), None
    trained, skipped = train_extraction_ranker(extract, [(e.text, e.values) for e in examples])
    if skipped:
        why = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        logger.info("extraction: the %s model answers (no ranker for %s)", small.engine, why)
        return ExtractionChoice(ExtractMethod.MODEL, f"no ranker for {why}"), None
    why = f"rankers trained on {len(examples)} worked examples in {trained.seconds:.1f} s"
    logger.info("extraction: %s", why)
    return ExtractionChoice(ExtractMethod.RANKER, why), trained
