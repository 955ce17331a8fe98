"""A run's plan: its shards and their part files, written before any shard runs, so a crashed run can be resumed.

A run's parts are committed only by its manifest. When a run dies mid-way, its plan stays behind without a
manifest; the next run with the same spec adopts it: it keeps the plan's id (and with it every part file name),
reuses each part the dead run finished whose documents are unchanged, processes the rest, and commits them all
in its own manifest. Parts no plan will use any more (from a plan for another spec, or a shard whose documents
left the source) are deleted at commit. So a crash followed by a re-run yields exactly one committed row per
document: never a duplicate, never a gap. Runs over one output must not overlap (deployments set
`concurrency_limit: 1`): a live run's plan looks like a dead one's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from fsspec.core import url_to_fs

from docroute.schemas.spec import JobSpec, OutputSpec
from docroute.tasks.discover import DocumentRef, Shard, cut_shards
from docroute.tasks.state import committed_run_ids
from docroute.tasks.write import results_part_url, write_json


def plans_dir(output: OutputSpec) -> str:
    return f"{output.url}/state/plans"


def plan_url(output: OutputSpec, plan_id: str) -> str:
    return f"{plans_dir(output)}/{plan_id}.json"


@dataclass
class RunPlan:
    """The shards of one run, where their parts go, and what the commit must clean up."""

    plan_id: str  # names the part files; a resumed plan keeps the dead run's id
    run_date: date
    spec_hash: str
    shards: list[Shard]
    resumed_from: str | None = None
    obsolete_parts: list[str] = field(default_factory=list)  # parts of abandoned plans or dropped shards
    obsolete_plans: list[str] = field(default_factory=list)  # plan ids to delete once committed

    def part_url(self, output: OutputSpec, shard_index: int) -> str:
        return results_part_url(output, self.run_date, self.plan_id, shard_index)

    def to_json(self) -> dict[str, object]:
        return {
            "plan_id": self.plan_id,
            "run_date": self.run_date.isoformat(),
            "spec_hash": self.spec_hash,
            "written_at": datetime.now(UTC).isoformat(),
            "shards": [
                {"index": s.index, "refs": [[r.uri, r.path, r.size, r.etag] for r in s.refs]} for s in self.shards
            ],
        }


def _read_plans(output: OutputSpec) -> list[dict]:
    fs, root = url_to_fs(plans_dir(output), **output.fsspec_options())
    fs.invalidate_cache(root)
    try:
        paths = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return []
    return [json.loads(fs.cat_file(p)) for p in paths]


def _planned_shards(plan: dict) -> list[Shard]:
    return [
        Shard(s["index"], tuple(DocumentRef(uri, path, size, etag) for uri, path, size, etag in s["refs"]))
        for s in plan["shards"]
    ]


def make_plan(spec: JobSpec, todo: Sequence[DocumentRef], run_id: str, run_date: date) -> RunPlan:
    """Cut this run's documents into shards, adopting a dead run's plan for the same spec when there is one."""
    committed = committed_run_ids(spec.output)
    open_plans = [p for p in _read_plans(spec.output) if p["plan_id"] not in committed]
    open_plans.sort(key=lambda p: p["written_at"])
    adopt = next((p for p in reversed(open_plans) if p["spec_hash"] == spec.spec_hash()), None)
    obsolete_parts: list[str] = []
    for plan in open_plans:
        if plan is not adopt:
            day = date.fromisoformat(plan["run_date"])
            obsolete_parts += [results_part_url(spec.output, day, plan["plan_id"], s["index"]) for s in plan["shards"]]
    obsolete_plans = [p["plan_id"] for p in open_plans if p is not adopt]
    if adopt is None:
        return RunPlan(
            run_id,
            run_date,
            spec.spec_hash(),
            cut_shards(todo, spec.shard_size),
            obsolete_parts=obsolete_parts,
            obsolete_plans=obsolete_plans,
        )
    day = date.fromisoformat(adopt["run_date"])
    remaining = {ref.uri: ref for ref in todo}
    shards: list[Shard] = []
    for planned in _planned_shards(adopt):
        current = tuple(remaining.pop(r.uri) for r in planned.refs if r.uri in remaining)
        if not current:  # every document of this shard is gone or already answered: its part is not needed
            obsolete_parts.append(results_part_url(spec.output, day, adopt["plan_id"], planned.index))
            continue
        unchanged = current == planned.refs  # same files, same ETags: the dead run's part can be reused
        shards.append(Shard(planned.index, current, resume=unchanged))
    left = [ref for ref in todo if ref.uri in remaining]
    start = max((s.index for s in _planned_shards(adopt)), default=-1) + 1
    shards += [Shard(start + s.index, s.refs) for s in cut_shards(left, spec.shard_size)]
    return RunPlan(
        adopt["plan_id"],
        day,
        spec.spec_hash(),
        shards,
        resumed_from=adopt["plan_id"],
        obsolete_parts=obsolete_parts,
        obsolete_plans=obsolete_plans,
    )


def write_plan(output: OutputSpec, plan: RunPlan) -> None:
    write_json(output, plan_url(output, plan.plan_id), plan.to_json())


def clean_up_after_commit(output: OutputSpec, plan: RunPlan) -> None:
    """Delete the committed plan, abandoned plans and parts nothing will commit (best effort: a leftover is harmless
    to readers that follow manifests, and the next commit tries again)."""
    fs, _ = url_to_fs(output.url, **output.fsspec_options())
    for url in plan.obsolete_parts:
        _, path = url_to_fs(url, **output.fsspec_options())
        if fs.exists(path):
            fs.rm(path)
    for plan_id in [plan.plan_id, *plan.obsolete_plans]:
        _, path = url_to_fs(plan_url(output, plan_id), **output.fsspec_options())
        if fs.exists(path):
            fs.rm(path)
