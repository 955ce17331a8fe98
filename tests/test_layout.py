"""The output layout (schemas/layout.py): every path a job writes, built and parsed in one place."""

from __future__ import annotations

from datetime import UTC, date, datetime

from docroute.schemas.layout import OutputLayout
from docroute.schemas.spec import OutputSpec


def test_every_path_is_under_the_output_root_as_the_readme_lists_it() -> None:
    layout = OutputSpec(url="s3://bucket/out").layout
    day = date(2026, 12, 1)
    paths = {
        layout.results_part(day, "plan1", 7): "results/run_date=2026-12-01/part-plan1-00007.parquet",
        layout.errors_part(day, "plan1", 7): "errors/run_date=2026-12-01/errors-plan1-00007.parquet",
        layout.batch_part(day, "run1", "batch/ab:c"): "results/run_date=2026-12-01/part-run1-batch-batch_ab_c.parquet",
        layout.labels_part(day, "plan1", 7): "labels/run_date=2026-12-01/labels-plan1-00007.parquet",
        layout.batch_labels_part(day, "run1", "b1"): "labels/run_date=2026-12-01/labels-run1-batch-b1.parquet",
        layout.costs(day, "run1"): "costs/run_date=2026-12-01/costs-run1.parquet",
        layout.run_record(day, "run1"): "runs/run_date=2026-12-01/run-run1.parquet",
        layout.state_snapshot("run1"): "state/documents/state-run1.parquet",
        layout.plan("plan1"): "state/plans/plan1.parquet",
        layout.lease(3): "state/leases/lease-0000000003.json",
        layout.frontier_batches("staging", "x.jsonl"): "state/frontier_batches/staging/x.jsonl",
        layout.router(): "router.json",
        layout.router("v1"): "routers/router-v1.json",
        layout.head("v1"): "heads/head-v1.npz",
        layout.classifier_choice("k"): "heads/choice-k.json",
        layout.ranker("v1"): "rankers/ranker-v1.npz",
        layout.training("v1", "report.json"): "training/v1/report.json",
        layout.embeddings("k"): "training/embeddings/k",
    }
    for built, relative in paths.items():
        assert built == f"s3://bucket/out/{relative}"


def test_manifest_names_sort_by_commit_time_and_carry_the_run_id() -> None:
    layout = OutputLayout("/out")
    early = layout.manifest("run-b", datetime(2026, 12, 1, 3, 4, 5, 6, tzinfo=UTC))
    late = layout.manifest("run-a", datetime(2026, 12, 1, 3, 4, 6, tzinfo=UTC))
    assert sorted([late, early]) == [early, late] and early.startswith("/out/manifests/")
    assert OutputLayout.manifest_run_id(early) == "run-b"
    assert OutputLayout.manifest_committed_at(early) == datetime(2026, 12, 1, 3, 4, 5, 6, tzinfo=UTC)
    assert OutputLayout.manifest_committed_at("/out/manifests/not-a-manifest.json") is None
