"""Measured classifier choices, kept beside the job's heads so a job measures its candidate encoders once.

`classify_strategy: auto` races the candidate encoders on the job's examples (engines/local/classify_choice.py), up to
30 s each. Measured again by every run and every worker process, a job would pay that each time and, since timing
budgets depend on machine load, could even choose differently in two workers of one run. The first build writes
its choice to `<output>/heads/choice-<key>.json` (the key hashes the candidates, labels and examples); later builds
read it and train only the winner's head. A different key (new examples, labels or candidates) measures afresh; an
unreadable file is ignored and measured over.
"""

from __future__ import annotations

import json
import logging

from fsspec.core import url_to_fs

from docroute.engines.local.classify_choice import ClassifierChoice
from docroute.schemas.spec import JobSpec
from docroute.tasks.store.write import atomic_write

logger = logging.getLogger(__name__)


def load_choice(spec: JobSpec, key: str) -> ClassifierChoice | None:
    """The choice stored under `key`, or None when there is none (or it cannot be read: then it is measured again)."""
    url = spec.output.layout.classifier_choice(key)
    fs, path = url_to_fs(url, **spec.output.fsspec_options())
    try:
        with fs.open(path, "rb") as handle:
            return ClassifierChoice.from_json(json.loads(handle.read()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:  # a damaged or foreign file: measure again, and say so
        logger.warning("ignoring the stored classifier choice %s (%s): measuring again", url, exc)
        return None


def save_choice(spec: JobSpec, key: str, choice: ClassifierChoice) -> str:
    url = spec.output.layout.classifier_choice(key)
    data = json.dumps(choice.to_json(), indent=2).encode()
    atomic_write(spec.output, url, lambda handle: handle.write(data))
    return url
