"""Listing, sharding and batched reading of a local source (object storage is covered with moto elsewhere)."""

from __future__ import annotations

from pathlib import Path

from docroute.schemas.spec import SourceSpec
from docroute.tasks.discover import cut_shards, list_documents
from docroute.tasks.read import document_id, read_documents


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
