"""Listing, sharding and batched reading of a local source (object storage is covered with moto elsewhere)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from corpus import COOKING, SPORTS, WEATHER, topic_job_yaml
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from s3_server import KEY, SECRET, make_bucket

from docroute.flows.process import process_documents
from docroute.schemas.documents import cut_shards
from docroute.schemas.errors import ExitCode
from docroute.schemas.load import load_job
from docroute.schemas.spec import SourceSpec
from docroute.tasks.ingest.discover import SourceNotFoundError, _etagger, list_documents
from docroute.tasks.ingest.read import document_id, read_documents
from docroute.tasks.store.current import current_rows


def _tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.md").write_text("# beta")
    (root / "report[1].txt").write_text("a name with glob characters")
    (root / ".DS_Store").write_bytes(b"\x00\x01")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("hidden folder")
    (root / "out").mkdir()
    (root / "out" / "part.txt").write_text("our own output must never be read back")


def test_listing_is_sorted_skips_hidden_files_and_the_output(tmp_path: Path) -> None:
    _tree(tmp_path)
    refs = list_documents(SourceSpec(url=str(tmp_path)), exclude_prefix=str(tmp_path / "out"))
    names = [Path(r.uri).name for r in refs]
    assert names == ["a.txt", "report[1].txt", "b.md"]
    assert all(r.uri.startswith("file://") and r.size and r.etag for r in refs)
    only_md = list_documents(SourceSpec(url=str(tmp_path), glob="**/*.md"))
    assert [Path(r.uri).name for r in only_md] == ["b.md"]


def test_a_single_file_url_lists_itself(tmp_path: Path) -> None:
    _tree(tmp_path)
    refs = list_documents(SourceSpec(url=str(tmp_path / "a.txt")))
    assert [Path(r.uri).name for r in refs] == ["a.txt"]


def test_a_source_that_does_not_exist_is_an_error_not_an_empty_listing(tmp_path: Path) -> None:
    """A typo or an unmounted disk must not end as a successful run of zero documents."""
    with pytest.raises(SourceNotFoundError, match="does not exist") as missing:
        list_documents(SourceSpec(url=str(tmp_path / "no-such-folder")))
    assert missing.value.exit_code == ExitCode.SOURCE
    (tmp_path / "empty").mkdir()
    assert list_documents(SourceSpec(url=str(tmp_path / "empty"))) == []  # there, and empty: no documents


def test_an_empty_prefix_is_empty_but_a_missing_bucket_is_an_error(s3_endpoint: str) -> None:
    fs = make_bucket(s3_endpoint, "listing-edges")
    fs.pipe("listing-edges/in/a.txt", b"hello")
    access = {"endpoint_url": s3_endpoint, "region": "us-east-1", "key": KEY, "secret": SECRET}
    listed = list_documents(SourceSpec.model_validate({"url": "s3://listing-edges/in", "s3": access}))
    assert [r.uri for r in listed] == ["s3://listing-edges/in/a.txt"]
    empty = SourceSpec.model_validate({"url": "s3://listing-edges/nothing-yet", "s3": access})
    assert list_documents(empty) == []  # objects may simply not have arrived
    with pytest.raises(SourceNotFoundError, match="bucket 'no-such-bucket'"):
        list_documents(SourceSpec.model_validate({"url": "s3://no-such-bucket/in", "s3": access}))


def test_shards_are_consecutive_and_complete(tmp_path: Path) -> None:
    _tree(tmp_path)
    refs = list_documents(SourceSpec(url=str(tmp_path)))
    shards = cut_shards(refs, 2)
    assert [s.index for s in shards] == list(range(len(shards)))
    assert [r for s in shards for r in s.refs] == refs
    assert all(1 <= s.size <= 2 for s in shards)


def test_reading_keeps_order_ids_and_reports_vanished_files(tmp_path: Path) -> None:
    _tree(tmp_path)
    source = SourceSpec(url=str(tmp_path), max_bytes=1000)
    refs = list_documents(source, exclude_prefix=str(tmp_path / "out"))
    (tmp_path / "a.txt").unlink()  # deleted between listing and reading
    documents = read_documents(source, refs)
    assert [d.uri for d in documents] == [r.uri for r in refs]
    assert documents[0].error.startswith("missing")
    assert documents[1].text == "a name with glob characters"
    assert documents[2].text == "beta" and documents[2].format == "md"
    assert documents[1].doc_id == document_id(refs[1].uri) != document_id(refs[1].uri, "0")
    assert documents[1].content_sha256 and len(documents[1].content_sha256) == 64


def test_a_source_folder_with_glob_characters_in_its_name_is_listed(tmp_path: Path) -> None:
    folder = tmp_path / "docs[1]*?"
    folder.mkdir()
    (folder / "a.txt").write_text("hello\n", encoding="utf-8")
    refs = list_documents(SourceSpec(url=str(folder)))
    assert [Path(r.path).name for r in refs] == ["a.txt"]


def test_a_record_id_never_collides_with_a_file_name() -> None:
    assert document_id("file:///d/x.jsonl", "0") != document_id("file:///d/x.jsonl#0")


def test_a_file_replaced_by_a_folder_fails_alone(tmp_path: Path) -> None:
    _tree(tmp_path)
    source = SourceSpec(url=str(tmp_path), max_bytes=1000)
    refs = list_documents(source, exclude_prefix=str(tmp_path / "out"))
    (tmp_path / "a.txt").unlink()
    (tmp_path / "a.txt").mkdir()  # listed as a file, a folder by the time it is read: no retry will help
    documents = read_documents(source, refs)
    assert documents[0].error.startswith("unreadable: IsADirectoryError")
    assert documents[1].text == "a name with glob characters" and documents[2].text == "beta"


# --------------------------------------------------------------------------------------------------------------------
# change_detection: content


def _same_size_edit_keeping_mtime(path: Path, text: str) -> None:
    """What rsync -t or a sync tool can do: new bytes, same size, the old modification time put back."""
    before = path.stat()
    assert len(text.encode()) == before.st_size
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _etags(source: SourceSpec) -> dict[str, str | None]:
    return {Path(r.path).name: r.etag for r in list_documents(source)}


def test_content_detection_sees_a_same_size_edit_with_its_mtime_restored(tmp_path: Path) -> None:
    _tree(tmp_path)
    metadata = SourceSpec(url=str(tmp_path))
    content = SourceSpec(url=str(tmp_path), change_detection="content")
    assert metadata.change_detection == "metadata"
    before_metadata, before_content = _etags(metadata), _etags(content)
    assert all(e and e.startswith("mtime:") for e in before_metadata.values())
    assert before_content["a.txt"] == f"sha256:{hashlib.sha256(b'alpha').hexdigest()}"
    assert _etags(content) == before_content  # stable from run to run

    _same_size_edit_keeping_mtime(tmp_path / "a.txt", "ALPHA")
    assert _etags(metadata) == before_metadata  # the default cannot tell
    after = _etags(content)
    assert after["a.txt"] == f"sha256:{hashlib.sha256(b'ALPHA').hexdigest()}" != before_content["a.txt"]
    assert {k: v for k, v in after.items() if k != "a.txt"} == {k: v for k, v in before_content.items() if k != "a.txt"}

    os.utime(tmp_path / "sub" / "b.md")  # touched, not edited: the content did not change
    assert _etags(content) == after


def test_content_hashes_stay_with_their_files_across_folders(tmp_path: Path) -> None:
    texts = {}
    for i in range(150):  # more files than the hashing window, over several folders
        folder = tmp_path / f"f{i % 3}"
        folder.mkdir(exist_ok=True)
        texts[f"d{i:03d}.txt"] = f"document {i} " * (i % 7 + 1)
        (folder / f"d{i:03d}.txt").write_text(texts[f"d{i:03d}.txt"])
    etags = _etags(SourceSpec(url=str(tmp_path), change_detection="content"))
    assert etags == {name: f"sha256:{hashlib.sha256(text.encode()).hexdigest()}" for name, text in texts.items()}


def test_content_detection_skips_oversized_files_and_keeps_listed_etags(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / "huge.txt").write_text("x" * 2000)
    etags = _etags(SourceSpec(url=str(tmp_path), change_detection="content", max_bytes=1000))
    assert etags["huge.txt"].startswith("mtime:")  # an error row whatever it holds: not read
    assert etags["a.txt"].startswith("sha256:")

    class NoReads(MemoryFileSystem):
        def open(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a file whose listing has a content ETag must not be read")

    listed = [("bucket/x.txt", {"name": "bucket/x.txt", "size": 3, "ETag": '"9a0364b9e99bb480dd25e1f0284c8555"'})]
    vanished = [(str(tmp_path / "gone.txt"), {"size": 3, "mtime": 1.5})]
    source = SourceSpec(url=str(tmp_path), change_detection="content")
    with _etagger(source, NoReads()) as etags_of:
        assert etags_of(listed) == ["9a0364b9e99bb480dd25e1f0284c8555"]
    with _etagger(source, LocalFileSystem()) as etags_of:
        assert etags_of(vanished) == ["mtime:1.5:3"]  # reading it will report it missing


@pytest.mark.usefixtures("prefect_server")
def test_a_content_detecting_job_reprocesses_a_same_size_edit_with_its_mtime_restored(tmp_path: Path) -> None:
    source = tmp_path / "docs"
    source.mkdir()
    for name, text in (("a.txt", SPORTS), ("b.txt", WEATHER), ("c.txt", COOKING)):
        (source / name).write_text(text)
    yaml = topic_job_yaml(source, tmp_path / "out")
    assert "  max_bytes:" in yaml
    job = tmp_path / "job.yaml"
    job.write_text(yaml.replace("  max_bytes:", "  change_detection: content\n  max_bytes:", 1), encoding="utf-8")

    first = process_documents(str(job))
    assert first.documents == 3
    _same_size_edit_keeping_mtime(source / "b.txt", WEATHER.replace("rain", "hail"))
    second = process_documents(str(job))
    assert second.documents == 1 and second.up_to_date == 2
    current = current_rows(load_job(job).output)
    edited = current.filter(pl.col("source_uri").str.ends_with("b.txt"))
    assert edited["run_id"].item() == second.run_id
