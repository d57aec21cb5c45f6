"""The SQLite store: reads, filters, atomic commits, validation errors."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from engine.errors import IndexStateError, QueryError
from engine.store import Changes, ErrorRecord, Filters, IndexNotFoundError, ItemRow, Store


def _row(item_id: int, path: str, modality: str = "image", **kw) -> ItemRow:
    base = dict(content_hash=f"h-{path}", size=10, mtime=1.0, added=100.0 + item_id)
    return ItemRow(id=item_id, path=path, modality=modality, **(base | kw))


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "idx", create=True)
    s.commit(Changes(rows=[
        _row(1, "/m/a.png"),
        _row(2, "/m/holiday/b.png"),
        _row(3, "/m/talk.wav", "speech", duration=70.0, segment=0, start=0.0, end=30.0, text="hi"),
        _row(4, "/m/talk.wav", "speech", duration=70.0, segment=1, start=25.0, end=55.0),
        _row(5, "/m/short.wav", "speech", duration=5.0, start=0.0, end=5.0),
        _row(6, "/m/copy.wav", "speech", duration=5.0, content_hash="h-/m/short.wav"),
    ]))  # fmt: skip
    yield s
    s.close()


def test_open_missing_index_says_how_to_build_one(tmp_path):
    with pytest.raises(IndexNotFoundError, match=r"no xmodal index at .*xmodal index FOLDER"):
        Store.open(tmp_path / "nowhere")
    assert issubclass(IndexNotFoundError, QueryError)
    assert issubclass(IndexNotFoundError, IndexStateError)


def test_wal_mode(store):
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_get_keeps_order_skips_missing_and_picks_columns(store):
    rows = store.get([3, 99, 1], ["path", "start"])
    assert rows == [
        {"id": 3, "path": "/m/talk.wav", "start": 0.0},
        {"id": 1, "path": "/m/a.png", "start": None},
    ]
    assert store.get([2])[0]["modality"] == "image"
    with pytest.raises(QueryError, match=r"unknown item columns \['colour'\]"):
        store.get([1], ["colour"])


def test_ids_counts_and_files(store):
    assert store.ids("speech").tolist() == [3, 4, 5, 6]
    assert store.counts() == {"image": 2, "speech": 4}
    assert store.file_counts() == {"image": 2, "speech": 3}
    talk = store.files()["/m/talk.wav"]
    assert talk.ids == (3, 4) and talk.modality == "speech"


def test_select_ids_filters(store):
    assert store.select_ids("image", Filters(path="*/holiday/*")).tolist() == [2]
    assert store.select_ids("image", Filters(path="*.png")).tolist() == [1, 2]
    assert store.select_ids("speech", Filters(min_duration=10)).tolist() == [3, 4]
    assert store.select_ids("speech", Filters(max_duration=10)).tolist() == [5, 6]
    assert store.select_ids("image", Filters(min_duration=0)).tolist() == []  # no duration
    assert store.select_ids("speech", Filters(added_since=104.0)).tolist() == [4, 5, 6]
    assert store.select_ids("speech", Filters(added_before=104.0)).tolist() == [3]
    assert not Filters() and Filters(path="*")


def test_same_content_groups_identical_files(store):
    assert store.same_content("speech") == [["/m/copy.wav", "/m/short.wav"]]
    assert store.same_content("image") == []


def test_moves_stats_deletes_and_errors(store):
    store.commit(Changes(
        moves=[("/m/a.png", "/m/z.png", 2.0)], stats=[("/m/talk.wav", 11, 3.0)],
        delete_ids=[5], errors=[ErrorRecord("/m/bad.png", "corrupt", 1.0)],
    ))  # fmt: skip
    assert store.get([1], ["path", "mtime"]) == [{"id": 1, "path": "/m/z.png", "mtime": 2.0}]
    assert {r["size"] for r in store.get([3, 4])} == {11}
    assert 5 not in store.ids().tolist()
    store.commit(Changes(errors=[ErrorRecord("/m/bad.png", "still corrupt", 2.0)]))
    assert [(e.path, e.reason) for e in store.errors()] == [("/m/bad.png", "still corrupt")]
    store.commit(Changes(clear_errors=["/m/bad.png"]))
    assert store.errors() == []


def test_rejected_commit_changes_nothing(store):
    """A commit that fails half-way (a duplicate id) leaves no trace, meta included."""
    before = (store.ids().tolist(), store.meta())
    with pytest.raises(IntegrityError):
        store.commit(Changes(delete_ids=[1], rows=[_row(2, "/m/dup.png")], meta={"x": "1"}))
    assert (store.ids().tolist(), store.meta()) == before


def test_reopen_from_disk_round_trip(store, tmp_path):
    store.commit(Changes(meta={"model_name": "stub"}))
    again = Store.open(tmp_path / "idx")
    try:
        assert again.get([1, 2, 3]) == store.get([1, 2, 3])
        assert again.meta()["model_name"] == "stub"
    finally:
        again.close()


def test_schema_version_mismatch_is_refused(store, tmp_path):
    store.commit(Changes(meta={"schema_version": "999"}))
    with pytest.raises(IndexStateError, match="schema version 999.*--rebuild"):
        Store.open(tmp_path / "idx")
