"""ParquetDatasetSink: a folder output read as one table, never losing nor duplicating a row."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from vlmbatch.errors import VlmbatchError, VlmbatchWarning
from vlmbatch.sinks.dataset_dir import LOCK_NAME, ParquetDatasetSink
from vlmbatch.sinks.outputs import is_folder_output, open_sink, written_paths
from vlmbatch.sinks.parquet_file import SETTINGS_KEY, ParquetSink

SCHEMA = pa.schema([("id", pa.string()), ("caption", pa.string()), ("error", pa.string())])
SETTINGS = {"model": "m", "prompt": "caption en"}


def rows(start: int, stop: int, caption: str = "a cat", error: str | None = None) -> list[dict]:
    return [{"id": f"{i:05d}", "caption": caption, "error": error} for i in range(start, stop)]


def sink_for(out, **options) -> ParquetDatasetSink:
    options = {"key": ("id",), "settings": SETTINGS, "failure_column": "error", "flush_rows": 4, **options}
    return ParquetDatasetSink(out, SCHEMA, **options)


def table(out: Path) -> pa.Table:
    return ds.dataset(out, format="parquet").to_table()


def data_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("out, folder", [("caps/", True), ("caps", True), ("caps.parquet", False),
                                         ("s3://bucket/caps", True), ("gs://bucket/caps.parquet", True)])
def test_which_names_are_folders(tmp_path: Path, monkeypatch, out: str, folder: bool) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_folder_output(out) is folder


def test_an_existing_file_without_a_suffix_stays_a_single_file(tmp_path: Path) -> None:
    old = tmp_path / "caps"
    with ParquetSink(old, SCHEMA, key=("id",), settings=SETTINGS) as sink:
        sink.write(rows(0, 2))
    assert not is_folder_output(old)
    assert isinstance(open_sink(old, SCHEMA, key=("id",), settings=SETTINGS), ParquetSink)
    assert is_folder_output(tmp_path)  # an existing folder is one


def test_rows_read_back_as_one_table_with_the_settings(tmp_path: Path) -> None:
    out = tmp_path / "caps"
    with sink_for(out) as sink:
        for row in rows(0, 10):
            sink.write([row])
    assert len(data_files(out)) == 3  # flushes of 4, 4 and 2 rows
    assert sorted(table(out).column("id").to_pylist()) == [f"{i:05d}" for i in range(10)]
    for name in data_files(out):
        metadata = pq.read_schema(out / name).metadata
        assert metadata[SETTINGS_KEY.encode()] == b'{"model": "m", "prompt": "caption en"}'
    assert not (out / LOCK_NAME).exists() or not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_resume_sees_every_row_and_a_rerun_adds_only_new_files(tmp_path: Path) -> None:
    out = tmp_path / "caps"
    with sink_for(out) as sink:
        sink.write(rows(0, 8))
    before = data_files(out)
    with sink_for(out) as sink:
        assert set(sink.done_keys()) == {(f"{i:05d}",) for i in range(8)}
        sink.write(rows(8, 10))
    after = data_files(out)
    assert set(before) < set(after) and len(after) == len(before) + 1  # old files untouched
    assert sorted(table(out).column("id").to_pylist()) == [f"{i:05d}" for i in range(10)]


def test_a_retried_failure_replaces_its_row_and_only_its_file_is_rewritten(tmp_path: Path) -> None:
    out = tmp_path / "caps"
    with sink_for(out) as sink:
        sink.write(rows(0, 4))
        sink.write(rows(4, 8, caption=None, error="cannot decode"))
    untouched, stale = data_files(out)
    mtime = os.stat(out / untouched).st_mtime_ns
    with sink_for(out) as sink:
        assert len(sink.done_keys()) == 4 and sink.failed_keys == {(f"{i:05d}",) for i in range(4, 8)}
        sink.write(rows(4, 6, caption="fixed"))
    got = {row["id"]: row for row in table(out).to_pylist()}
    assert len(got) == table(out).num_rows == 8  # each id once
    assert [got[f"{i:05d}"]["caption"] for i in range(4, 8)] == ["fixed", "fixed", None, None]
    assert os.stat(out / untouched).st_mtime_ns == mtime
    assert stale in data_files(out)  # rewritten in place: its two rows that stayed failures


def test_other_settings_and_foreign_files_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "caps"
    with sink_for(out) as sink:
        sink.write(rows(0, 2))
    with pytest.raises(VlmbatchError, match="settings"):
        sink_for(out, settings={"model": "other", "prompt": "caption en"})
    (out / "notes.txt").write_text("mine")
    with pytest.raises(VlmbatchError, match="notes.txt"):
        sink_for(out)


def test_overwrite_starts_the_folder_afresh(tmp_path: Path) -> None:
    out = tmp_path / "caps"
    with sink_for(out) as sink:
        sink.write(rows(0, 6))
    with sink_for(out, settings={"model": "other"}, overwrite=True) as sink:
        assert sink.done_keys() == {}
        sink.write(rows(10, 11))
    assert table(out).column("id").to_pylist() == ["00010"]


def test_a_damaged_file_is_set_aside_and_its_rows_made_again(tmp_path: Path) -> None:
    out = tmp_path / "caps"
    with sink_for(out) as sink:
        sink.write(rows(0, 4))
        sink.write(rows(4, 8))
    damaged = out / data_files(out)[0]
    data = bytearray(damaged.read_bytes())
    data[20:60] = b"\xff" * 40  # a data page, behind an intact footer
    damaged.write_bytes(bytes(data))
    with pytest.warns(VlmbatchWarning, match="could not be read"):
        sink = sink_for(out)
    with sink:
        assert set(sink.done_keys()) == {(f"{i:05d}",) for i in range(4, 8)}
        sink.write(rows(0, 4))
    assert sorted(table(out).column("id").to_pylist()) == [f"{i:05d}" for i in range(8)]
    assert any(p.name.startswith(".") and "corrupt" in p.name for p in out.iterdir())


def test_a_second_run_is_locked_out(tmp_path: Path) -> None:
    out = tmp_path / "caps"
    with sink_for(out):
        with pytest.raises(VlmbatchError, match="being written by another vlmbatch run"):
            sink_for(out)


def test_an_object_store_folder_through_pyarrow_fs(tmp_path: Path) -> None:
    """Any pyarrow filesystem but the local one takes the object-store path: whole uploads, no rename."""
    store = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    (tmp_path / "bucket").mkdir()
    with sink_for("prefix/caps", filesystem=store) as sink:
        sink.write(rows(0, 4) + rows(4, 6, caption=None, error="broken"))
    with sink_for("prefix/caps", filesystem=store) as sink:
        assert len(sink.done_keys()) == 4 and len(sink.failed_keys) == 2
        sink.write(rows(4, 6, caption="fixed"))
    got = table(tmp_path / "bucket" / "prefix" / "caps")
    assert sorted(got.column("id").to_pylist()) == [f"{i:05d}" for i in range(6)]
    assert got.column("error").null_count == 6


def test_written_paths_name_the_folder_so_a_source_never_reads_it(tmp_path: Path) -> None:
    assert written_paths(str(tmp_path / "caps") + "/")[0] == tmp_path / "caps"
    assert written_paths("s3://bucket/caps/") == ()
