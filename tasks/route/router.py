"""The calibrated router: certified thresholds per part, written by `docroute calibrate`, read by every run.

Each calibration writes `<output>/routers/router-<version>.json` and then `<output>/router.json`, a copy of the
current one. A run uses the router only when its spec hash matches the job's (a changed task or model would make
its guarantee meaningless) and records the router's version on every row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fsspec.core import url_to_fs

from docroute.engines.scoring.calibration import Calibrator
from docroute.schemas.spec import JobSpec
from docroute.tasks.route.certify import Certificate
from docroute.tasks.store.write import write_json


@dataclass(frozen=True)
class Router:
    """Thresholds with their certificates, and each part's confidence calibration."""

    version: str
    created_at: str
    job: str
    spec_hash: str
    small_model: str
    target_accuracy: float
    delta: float
    sample_size: int
    labels_source: str
    certificates: dict[str, Certificate]
    calibrators: dict[str, Calibrator] = field(default_factory=dict)
    head_version: str | None = None  # the classification head `docroute train` fitted (None: trained from examples)
    guarantee: str = "kept"  # what the certificates bound: "kept" rows, the "overall" output, or "mixed" parts

    def thresholds(self) -> dict[str, float | None]:
        """What routing compares each part's confidence with (None: this part always escalates)."""
        return {part: cert.threshold for part, cert in self.certificates.items()}

    @property
    def meets_target(self) -> bool:
        return all(cert.threshold is not None for cert in self.certificates.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "created_at": self.created_at,
            "job": self.job,
            "spec_hash": self.spec_hash,
            "small_model": self.small_model,
            "target_accuracy": self.target_accuracy,
            "delta": self.delta,
            "sample_size": self.sample_size,
            "labels_source": self.labels_source,
            "certificates": {part: cert.to_json() for part, cert in self.certificates.items()},
            "calibrators": {part: cal.to_json() for part, cal in self.calibrators.items()},
            "head_version": self.head_version,
            "guarantee": self.guarantee,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Router:
        return cls(
            version=data["version"],
            created_at=data["created_at"],
            job=data["job"],
            spec_hash=data["spec_hash"],
            small_model=data["small_model"],
            target_accuracy=float(data["target_accuracy"]),
            delta=float(data["delta"]),
            sample_size=int(data["sample_size"]),
            labels_source=data.get("labels_source", ""),
            certificates={p: Certificate.from_json(c) for p, c in data["certificates"].items()},
            calibrators={p: Calibrator.from_json(c) for p, c in data.get("calibrators", {}).items()},
            head_version=data.get("head_version"),
            guarantee=str(data.get("guarantee", "kept")),  # routers written before the choice existed: "kept"
        )


def new_version(spec_hash: str, created_at: datetime) -> str:
    """Sortable and unique: the creation time, then a short hash."""
    digest = hashlib.sha256(f"{spec_hash}{created_at.isoformat()}".encode()).hexdigest()[:8]
    return f"{created_at.strftime('%Y%m%dT%H%M%SZ')}-{digest}"


def write_router(spec: JobSpec, router: Router, *, current: bool = True) -> str:
    """Write the versioned router, then (unless `current` is off) make it current; returns the versioned URL."""
    versioned = spec.output.layout.router(router.version)
    write_json(spec.output, versioned, router.to_json())
    if current:
        write_json(spec.output, spec.output.layout.router(), router.to_json())
    return versioned


def load_router(spec: JobSpec) -> Router | None:
    """The current router, if one exists (spec-hash checks are the caller's: see `usable_router`)."""
    fs, path = url_to_fs(spec.output.layout.router(), **spec.output.fsspec_options())
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as handle:
        return Router.from_json(json.loads(handle.read()))


def usable_router(spec: JobSpec) -> tuple[Router | None, str]:
    """The router a run should use, and a sentence saying which and why."""
    if not spec.routing.use_router:
        return None, "routing.use_router is off: thresholds from the job file"
    router = load_router(spec)
    if router is None:
        return None, "no calibrated router yet (run docroute calibrate): thresholds from the job file"
    if router.spec_hash != spec.spec_hash():
        return None, (
            f"router {router.version} was calibrated for another task or model (spec hash {router.spec_hash}, "
            f"now {spec.spec_hash()}): thresholds from the job file until docroute calibrate runs again"
        )
    head = f" with trained head {router.head_version}" if router.head_version else ""
    return router, f"calibrated router {router.version}{head}"


def created_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
