"""Failures a scheduler must tell apart: each kind of docroute error carries its exit code, and the CLI ends with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from docroute.schemas.errors import DocrouteError, ExitCode, SourceError, StorageError
from docroute.schemas.spec import OutputSpec
from docroute.tasks.store.write import OutputWriteError, write_json, write_parquet


def test_an_output_that_cannot_be_written_is_a_storage_error_and_still_an_oserror(tmp_path: Path) -> None:
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be", encoding="utf-8")
    output = OutputSpec(url=str(blocker))
    with pytest.raises(OutputWriteError, match="cannot write") as failed:
        write_json(output, f"{blocker}/runs/r.json", {"a": 1})
    assert isinstance(failed.value, StorageError) and isinstance(failed.value, OSError)
    assert failed.value.exit_code is ExitCode.STORAGE
    import pyarrow as pa

    with pytest.raises(OutputWriteError):
        write_parquet(output, f"{blocker}/results/part.parquet", pa.table({"a": [1]}))


def test_every_kind_has_its_own_exit_code() -> None:
    from docroute.schemas.errors import InputError, StateError, TransientError

    kinds = [DocrouteError, InputError, StateError, SourceError, StorageError, TransientError]
    codes = [kind.exit_code for kind in kinds]
    assert len(set(codes)) == len(codes) and ExitCode.OK not in codes
