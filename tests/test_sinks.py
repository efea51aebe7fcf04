"""ParquetSink: rows flushed are never lost nor duplicated, whatever moment the process dies at."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmbatch.errors import VlmbatchError, VlmbatchWarning
from vlmbatch.sinks.parquet_file import SETTINGS_KEY, WRITTEN_AT_KEY, ParquetSink

SCHEMA = pa.schema([("id", pa.string()), ("caption", pa.string()), ("score", pa.float32())])
SETTINGS = {
    "model": "google/paligemma-3b-mix-224",
    "prompt": "caption en",
    "generation": {"max_new_tokens": 20},
}
REPO = Path(__file__).resolve().parents[1]


def rows(start: int, stop: int, caption: str = "a cat") -> list[dict]:
    return [{"id": f"{i:05d}", "caption": caption, "score": 0.5} for i in range(start, stop)]


def open_sink(out: Path, **options) -> ParquetSink:
    options = {"key": ("id",), "settings": SETTINGS, "flush_rows": 4, **options}
    return ParquetSink(out, SCHEMA, **options)


def ids_in(out: Path) -> list[str]:
    return pq.read_table(out).column("id").to_pylist()


def keys(start: int, stop: int) -> set[tuple]:
    return {(f"{i:05d}",) for i in range(start, stop)}


def sidecars(out: Path) -> list[str]:
    """Everything next to OUT other than OUT itself: must be nothing after a clean close."""
    return sorted(p.name for p in out.parent.iterdir() if p != out)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "results" / "captions.parquet"


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way handles it."""


def abandon(sink: ParquetSink) -> None:
    """Leave `sink` as a killed process would: no close, buffer lost, lock dropped by the kernel."""
    sink._lock.release()


def close_dying_before_parts_are_deleted(sink: ParquetSink, monkeypatch) -> None:
    """Close `sink`, the process dying after the merged OUT replaced the old one, before any part is deleted."""
    real_unlink = Path.unlink

    def dying_unlink(self, *args, **kwargs):
        if self.name.startswith("part-"):
            raise Crash
        real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", dying_unlink)
    with pytest.raises(Crash):
        sink.close()
    monkeypatch.setattr(Path, "unlink", real_unlink)


def test_write_close_read_back(out: Path) -> None:
    with open_sink(out, metadata={"vlmbatch.version": "0.1.0"}) as sink:
        sink.write(rows(0, 10))
        assert sink.done_keys().keys() == keys(0, 10)
    table = pq.read_table(out)
    assert table.to_pylist() == rows(0, 10)
    assert table.schema.remove_metadata() == SCHEMA
    metadata = pq.read_schema(out).metadata
    assert json.loads(metadata[SETTINGS_KEY.encode()]) == SETTINGS
    assert metadata[b"vlmbatch.version"] == b"0.1.0" and WRITTEN_AT_KEY.encode() in metadata
    assert sidecars(out) == []


def test_parts_merge_into_large_row_groups(out: Path) -> None:
    with open_sink(out, flush_rows=1) as sink:
        for row in rows(0, 12):
            sink.write([row])
        assert len(list(sink.parts_dir.iterdir())) == 12
    assert pq.ParquetFile(out).metadata.num_row_groups == 1


def test_empty_run_still_produces_a_valid_file(out: Path) -> None:
    open_sink(out).close()
    assert pq.read_table(out).num_rows == 0 and sidecars(out) == []


def test_resume_appends_without_duplicates(out: Path) -> None:
    with open_sink(out) as sink:
        sink.write(rows(0, 6))
    with open_sink(out) as sink:
        assert sink.done_keys().keys() == keys(0, 6)
        sink.write(rows(6, 9))
        sink.write(rows(3, 5, caption="rewritten"))  # a key written again: its latest row replaces the first
    table = {row["id"]: row["caption"] for row in pq.read_table(out).to_pylist()}
    assert len(pq.read_table(out)) == len(table) == 9
    assert table == {f"{i:05d}": "rewritten" if i in (3, 4) else "a cat" for i in range(9)}


def test_flush_rows_and_flush_seconds(out: Path) -> None:
    sink = open_sink(out, flush_rows=3, flush_seconds=3600)
    sink.write(rows(0, 2))
    assert list(sink.parts_dir.iterdir()) == []  # still buffered
    sink.write(rows(2, 3))
    assert len(list(sink.parts_dir.iterdir())) == 1
    sink.close()
    eager = open_sink(out, flush_rows=1000, flush_seconds=0.0)
    eager.write(rows(3, 4))
    assert len(list(eager.parts_dir.iterdir())) == 1
    eager.close()


def test_crash_without_close_is_recovered_exactly_once(out: Path) -> None:
    sink = open_sink(out)
    sink.write(rows(0, 10))  # flushed: 10 >= flush_rows
    sink.write(rows(10, 11))  # buffered only: lost by the crash, which is allowed
    abandon(sink)

    recovered = open_sink(out)
    assert recovered.done_keys().keys() == keys(0, 10)
    recovered.write(rows(10, 12))
    recovered.close()
    assert ids_in(out) == [f"{i:05d}" for i in range(12)]


def test_crash_during_merge_before_replace(out: Path, monkeypatch) -> None:
    with open_sink(out) as sink:
        sink.write(rows(0, 4))
    sink = open_sink(out)
    sink.write(rows(4, 8))
    real_replace = os.replace

    def dying_replace(src, dst):
        if Path(dst) == out:
            raise Crash
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(Crash):
        sink.close()
    monkeypatch.setattr(os, "replace", real_replace)
    assert ids_in(out) == [f"{i:05d}" for i in range(4)]  # the old file is intact

    with open_sink(out) as resumed:
        assert resumed.done_keys().keys() == keys(0, 8)
    assert ids_in(out) == [f"{i:05d}" for i in range(8)]
    assert sidecars(out) == []


def test_crash_after_replace_before_parts_are_deleted(out: Path, monkeypatch) -> None:
    sink = open_sink(out)
    sink.write(rows(0, 4))
    sink.write(rows(4, 8))
    close_dying_before_parts_are_deleted(sink, monkeypatch)
    assert ids_in(out) == [f"{i:05d}" for i in range(8)]
    assert len(list(sink.parts_dir.iterdir())) == 2  # both parts are also still there

    with open_sink(out) as resumed:
        assert resumed.done_keys().keys() == keys(0, 8)
        resumed.write(rows(8, 10))
    assert ids_in(out) == [f"{i:05d}" for i in range(10)]  # each key exactly once
    assert sidecars(out) == []


def test_leftover_temporary_files_are_ignored(out: Path) -> None:
    sink = open_sink(out)
    sink.write(rows(0, 4))
    (sink.parts_dir / ".part-000001.parquet.tmp").write_bytes(b"half a part")
    (out.parent / f".{out.name}.tmp").write_bytes(b"half a merge")
    abandon(sink)
    with open_sink(out):
        pass
    assert ids_in(out) == [f"{i:05d}" for i in range(4)] and sidecars(out) == []


CHILD = textwrap.dedent(
    """
    import sys
    import pyarrow as pa
    from vlmbatch.sinks.outputs import open_sink

    schema = pa.schema([("id", pa.string()), ("caption", pa.string())])
    sink = open_sink(sys.argv[1], schema, key=("id",), settings={"model": "m"}, flush_rows=10**9)
    done = sink.done_keys()
    index = 0
    while True:
        if (f"{index:07d}",) not in done:
            sink.write([{"id": f"{index:07d}", "caption": "x" * 100}])
            if index % 7 == 6:
                sink.flush()
                print(index + 1, flush=True)  # every row below this is flushed
        index += 1
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["caps.parquet", "caps/"], ids=["file", "dataset-folder"])
def test_sigkill_at_arbitrary_moments_loses_and_duplicates_nothing(tmp_path: Path, name: str) -> None:
    from pyarrow import dataset as pads

    from vlmbatch.sinks.outputs import open_sink

    out = str(tmp_path / name) + ("/" if name.endswith("/") else "")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    flushed = 0
    for run in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, out], stdout=subprocess.PIPE, text=True, env=env
        )
        for line in child.stdout:
            flushed = max(flushed, int(line))
            if flushed >= 70 * (run + 1):
                break
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL

    schema = pa.schema([("id", pa.string()), ("caption", pa.string())])
    with open_sink(out, schema, key=("id",), settings={"model": "m"}) as sink:
        done = sink.done_keys()
    folder = name.endswith("/")
    table = pads.dataset(out).to_table(columns=["id"]) if folder else pq.read_table(out, columns=["id"])
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(done)  # no duplicates
    assert {(i,) for i in ids} == done.keys()
    assert {f"{i:07d}" for i in range(flushed)} <= set(ids)  # nothing reported flushed was lost
    assert sorted(ids) == [f"{i:07d}" for i in range(len(ids))]  # resumed runs continued where the last stopped
    if folder:
        assert not any(p.name.endswith(".tmp") for p in Path(out).iterdir())


# -- failed rows: tried again, replaced by what the retry gives ---------------------------------------
FAILING = pa.schema([("id", pa.string()), ("caption", pa.string()), ("error", pa.string())])


def open_failing_sink(out: Path, **options) -> ParquetSink:
    options = {"key": ("id",), "failure_column": "error", "settings": SETTINGS, "flush_rows": 1, **options}
    return ParquetSink(out, FAILING, **options)


def ok(key: str, caption: str = "a cat") -> dict:
    return {"id": key, "caption": caption, "error": None}


def failed(key: str, reason: str = "not an image") -> dict:
    return {"id": key, "caption": None, "error": reason}


def table_of(out: Path) -> dict[str, dict]:
    got = pq.read_table(out).to_pylist()
    assert len(got) == len({r["id"] for r in got}), got  # each key exactly once
    return {r.pop("id"): r for r in got}


def test_a_failed_key_is_not_done_and_its_retry_replaces_it(out: Path) -> None:
    with open_failing_sink(out) as sink:
        sink.write([ok("a"), failed("b"), failed("c")])
    with open_failing_sink(out) as sink:
        assert sink.done_keys().keys() == {("a",)} and sink.failed_keys == {("b",), ("c",)}
        assert sink.write([ok("b", "a dog"), failed("c", "image file is truncated")]) == 2
    assert table_of(out) == {"a": {"caption": "a cat", "error": None}, "b": {"caption": "a dog", "error": None},
                             "c": {"caption": None, "error": "image file is truncated"}}


def test_a_repeated_failure_rewrites_nothing(out: Path) -> None:
    with open_failing_sink(out) as sink:
        sink.write([ok("a"), failed("b")])
    before = out.read_bytes()
    with open_failing_sink(out) as sink:
        sink.done_keys()
        assert sink.write([failed("b")]) == 0
    assert out.read_bytes() == before  # not even merged again: no part was written


def test_a_key_written_again_keeps_its_latest_row(out: Path) -> None:
    """Whatever the mix of outcomes (a caller writes a key again only when its row is out of date: a
    failure retried, an image replaced), within a part, across parts and against OUT."""
    with open_failing_sink(out) as sink:
        sink.write([ok("a"), failed("b"), ok("b", "first"), ok("b", "second")])
        sink.write([failed("a", "replaced by a broken file")])
        sink.write([ok("c"), failed("c")])
    with open_failing_sink(out) as sink:
        assert sink.done_keys().keys() == {("b",)} and sink.failed_keys == {("a",), ("c",)}
        sink.write([ok("c", "third")])
    assert table_of(out) == {"a": {"caption": None, "error": "replaced by a broken file"},
                             "b": {"caption": "second", "error": None}, "c": {"caption": "third", "error": None}}


def test_retries_survive_a_crash_after_the_merge_replaced_out(out: Path, monkeypatch) -> None:
    """The crash that leaves OUT and its parts both holding the retried rows: the next merge still keeps
    one row per key, the retry's."""
    with open_failing_sink(out) as sink:
        sink.write([failed("a"), failed("b"), ok("c")])
    sink = open_failing_sink(out)
    assert sink.done_keys().keys() == {("c",)}
    sink.write([ok("a", "a dog"), failed("b", "still broken")])
    close_dying_before_parts_are_deleted(sink, monkeypatch)
    expected = {"a": {"caption": "a dog", "error": None}, "b": {"caption": None, "error": "still broken"},
                "c": {"caption": "a cat", "error": None}}
    assert table_of(out) == expected and len(list(sink.parts_dir.iterdir())) == 1
    with open_failing_sink(out) as resumed:
        assert resumed.done_keys().keys() == {("a",), ("c",)} and resumed.failed_keys == {("b",)}
    assert table_of(out) == expected and sidecars(out) == []


def test_failures_left_in_parts_by_a_killed_run_are_retried(out: Path) -> None:
    sink = open_failing_sink(out)
    sink.write([failed("a"), ok("b")])
    abandon(sink)
    with open_failing_sink(out) as sink:
        assert sink.done_keys().keys() == {("b",)} and sink.failed_keys == {("a",)}
        sink.write([ok("a")])
    assert table_of(out) == {"a": {"caption": "a cat", "error": None}, "b": {"caption": "a cat", "error": None}}


VERSIONED = FAILING.append(pa.field("version", pa.string()))


def test_done_keys_give_the_version_each_row_was_made_from(out: Path) -> None:
    sink = ParquetSink(out, VERSIONED, key=("id",), failure_column="error", version_column="version",
                       settings=SETTINGS, flush_rows=1)
    sink.write([{**ok("a"), "version": "10:1"}, {**ok("b"), "version": None}, {**failed("c"), "version": "7:1"}])
    sink.write([{**ok("a", "a dog"), "version": "12:2"}])  # the file was replaced
    assert sink.done_keys() == {("a",): "12:2", ("b",): None}
    sink.close()
    assert pq.read_table(out).to_pylist()[-1] == {"id": "a", "caption": "a dog", "error": None, "version": "12:2"}


def test_an_output_from_before_a_nullable_column_was_added_is_resumed(out: Path) -> None:
    """Upgrading must not force re-captioning a whole collection: a file (and parts a killed run left)
    without the new column is read with nulls there, and the merged file has the new schema."""
    with open_failing_sink(out) as sink:
        sink.write([ok("a"), failed("b")])
    killed = open_failing_sink(out)
    killed.write([ok("c")])
    abandon(killed)
    newer = ParquetSink(out, VERSIONED, key=("id",), failure_column="error", version_column="version",
                        settings=SETTINGS, flush_rows=1)
    assert newer.done_keys() == {("a",): None, ("c",): None} and newer.failed_keys == {("b",)}
    newer.write([{**ok("b", "a dog"), "version": "3:4"}])
    newer.close()
    assert pq.read_schema(out).remove_metadata().equals(VERSIONED)
    assert pq.read_table(out).to_pylist() == [{**ok("a"), "version": None}, {**ok("c"), "version": None},
                                              {**ok("b", "a dog"), "version": "3:4"}]
    other = out.with_name("other.parquet")
    ParquetSink(other, FAILING, key=("id",), settings=SETTINGS).close()
    required = FAILING.append(pa.field("version", pa.string(), nullable=False))
    with pytest.raises(VlmbatchError, match="different columns"):  # old rows could not fill it
        ParquetSink(other, required, key=("id",), settings=SETTINGS)


def test_failure_column_must_be_in_the_schema(out: Path) -> None:
    with pytest.raises(ValueError, match="failure column 'reason'"):
        open_failing_sink(out, failure_column="reason")


def test_settings_mismatch_names_the_differences(out: Path) -> None:
    with open_sink(out) as sink:
        sink.write(rows(0, 2))
    changed = {**SETTINGS, "generation": {"max_new_tokens": 40}, "prompt": "caption es"}
    with pytest.raises(VlmbatchError) as info:
        open_sink(out, settings=changed)
    message = str(info.value)
    assert "generation.max_new_tokens: 20 -> 40" in message
    assert 'prompt: "caption en" -> "caption es"' in message
    assert "model" not in message.split("(")[1]  # unchanged settings are not listed
    assert "--overwrite" in message and "--out" in message and "\n" not in message


def test_settings_mismatch_with_leftover_parts_only(out: Path) -> None:
    sink = open_sink(out)
    sink.write(rows(0, 4))
    abandon(sink)
    with pytest.raises(VlmbatchError, match=r"\.parts/part-000000\.parquet was written with different"):
        open_sink(out, settings={**SETTINGS, "model": "other"})


def test_a_setting_no_longer_recorded_is_not_compared_but_a_new_one_is(out: Path) -> None:
    """Output written when a setting was recorded that no longer is (the model's name, before the
    weights alone identified the model) is resumed; a setting the old output lacks is a difference."""
    with open_sink(out, settings={**SETTINGS, "retired": "any value"}) as sink:
        sink.write(rows(0, 3))
    with open_sink(out) as sink:
        assert sorted(k for (k,) in sink.done_keys()) == sorted(ids_in(out)) == ["00000", "00001", "00002"]
        sink.write(rows(3, 4))
    assert len(ids_in(out)) == 4
    assert json.loads(pq.read_schema(out).metadata[SETTINGS_KEY.encode()]) == SETTINGS
    with pytest.raises(VlmbatchError, match=r"different settings \(added: \(unset\) -> 1\)"):
        open_sink(out, settings={**SETTINGS, "added": 1})


def test_schema_mismatch(out: Path) -> None:
    open_sink(out).close()
    other = pa.schema([("id", pa.string()), ("caption", pa.large_string()), ("answer", pa.string())])
    expected = r"different columns \(no column 'answer'; extra column 'score'; 'caption' is string, not large"
    with pytest.raises(VlmbatchError, match=expected):
        ParquetSink(out, other, key=("id",), settings=SETTINGS)


def test_foreign_or_corrupt_output_is_not_touched(out: Path) -> None:
    out.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows(0, 1), schema=SCHEMA), out)
    with pytest.raises(VlmbatchError, match="not written by vlmbatch"):
        open_sink(out)
    out.write_bytes(b"not parquet")
    with pytest.raises(VlmbatchError, match="not a readable Parquet file"):
        open_sink(out)
    assert out.read_bytes() == b"not parquet"


def test_overwrite_starts_afresh(out: Path) -> None:
    with open_sink(out) as sink:
        sink.write(rows(0, 5))
    leftover = open_sink(out)
    leftover.write(rows(5, 9))
    abandon(leftover)
    with open_sink(out, settings={**SETTINGS, "model": "other"}, overwrite=True) as sink:
        assert sink.done_keys().keys() == set()
        sink.write(rows(100, 101))
    assert ids_in(out) == ["00100"]
    assert json.loads(pq.read_schema(out).metadata[SETTINGS_KEY.encode()])["model"] == "other"


def test_context_manager_finalizes_on_errors_and_ctrl_c(out: Path) -> None:
    for error, start in ((RuntimeError, 0), (KeyboardInterrupt, 2)):
        with pytest.raises(error):
            with open_sink(out, flush_rows=100) as sink:
                sink.write(rows(start, start + 2))  # buffered only
                raise error
        assert ids_in(out) == [f"{i:05d}" for i in range(start + 2)] and sidecars(out) == []


def test_second_concurrent_run_is_refused(out: Path) -> None:
    first = open_sink(out)
    with pytest.raises(VlmbatchError, match="being written by another vlmbatch run"):
        open_sink(out)
    first.close()
    open_sink(out).close()


def test_unwritable_outputs_fail_at_construction(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(VlmbatchError, match="cannot write output"):
        open_sink(tmp_path / "a-file" / "out.parquet")
    (tmp_path / "a-dir").mkdir()
    with pytest.raises(VlmbatchError, match="is a directory"):
        open_sink(tmp_path / "a-dir")
    with pytest.raises(VlmbatchError, match=r"a \.CSV file, but vlmbatch writes Parquet: name it .*caps\.parquet"):
        open_sink(tmp_path / "caps.CSV")
    assert not list(tmp_path.glob("caps*"))  # nothing was created for it, not even a lock
    for name in ("caps.parquet", "caps.pq", "caps", "caps.v2.parquet"):
        open_sink(tmp_path / name).close()


def test_permission_denied_fails_at_construction(tmp_path: Path, monkeypatch) -> None:
    """The OS refusing to create the output's files (as for a read-only folder; root ignores
    permission bits, so the refusal is injected) is one clear error before any work."""
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.parent.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    (tmp_path / "locked").mkdir()
    with pytest.raises(VlmbatchError, match="cannot write output .*Permission denied"):
        open_sink(tmp_path / "locked" / "out.parquet")


# -- a lock file deleted or replaced by hand lets a second run in: neither loses the other's rows ----------
def replace_by_another_file(lock: Path) -> None:
    lock.unlink()
    lock.write_text("")


@pytest.mark.parametrize("tamper", [Path.unlink, replace_by_another_file], ids=["deleted", "replaced"])
def test_a_run_whose_lock_was_taken_stops_before_replacing_out(out: Path, tamper) -> None:
    with open_sink(out) as sink:
        sink.write(rows(0, 4))
    before = out.read_bytes()
    sink = open_sink(out, flush_rows=100)
    sink.write(rows(4, 6))
    sink.flush()
    lock = out.with_name(out.name + ".lock")
    tamper(lock)
    sink.write(rows(6, 8))  # buffered: saved as a part by close, which then stops
    with pytest.raises(VlmbatchError) as info:
        sink.close()
    message = str(info.value)
    assert f"the lock {lock} was deleted or replaced" in message and "stopped without replacing" in message
    assert "\n" not in message
    assert out.read_bytes() == before  # not replaced
    parts = sorted(sink.parts_dir.glob("part-*.parquet"))
    assert [pq.read_table(p).column("id").to_pylist() for p in parts] == [ids_in_rows(4, 6), ids_in_rows(6, 8)]
    assert lock.exists() == (tamper is replace_by_another_file)  # another run's lock is not ours to delete
    lock.unlink(missing_ok=True)
    with open_sink(out):  # the next run merges what the stopped one saved
        pass
    assert ids_in(out) == ids_in_rows(0, 8) and sidecars(out) == []


def ids_in_rows(start: int, stop: int) -> list[str]:
    return [row["id"] for row in rows(start, stop)]


def test_two_runs_let_in_by_a_deleted_lock_never_write_over_each_others_parts(out: Path) -> None:
    first = open_sink(out, flush_rows=100)
    first.write(rows(0, 2))
    first.flush()
    out.with_name(out.name + ".lock").unlink()
    second = open_sink(out, flush_rows=100)  # let in
    second.write(rows(10, 12))
    second.flush()
    first.write(rows(2, 4))
    with pytest.raises(VlmbatchError, match="was deleted or replaced"):  # the first stops at its next flush ...
        first.flush()
    parts = {p.name: pq.read_table(p).column("id").to_pylist() for p in first.parts_dir.glob("part-*.parquet")}
    assert sorted(parts.values()) == [ids_in_rows(0, 2), ids_in_rows(2, 4), ids_in_rows(10, 12)]  # ... having saved
    second.close()  # merges every part, the first run's included
    merged = out.read_bytes()
    assert sorted(ids_in(out)) == ids_in_rows(0, 4) + ids_in_rows(10, 12)
    first.close()  # nothing of its own left unmerged: it lets go
    assert out.read_bytes() == merged and sidecars(out) == []


def test_temporary_names_are_each_writers_own(out: Path, monkeypatch) -> None:
    """Two writers of one file (two runs, when a deleted lock let the second in) must never write into
    one temporary file: its name carries the process and a random token."""
    temporaries: list[str] = []
    real_open = open

    def recording_open(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            temporaries.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", recording_open)
    for _ in range(2):
        with open_sink(out) as sink:
            sink.write(rows(0, 4))
    monkeypatch.setattr("builtins.open", real_open)
    assert len(temporaries) == 4 and len(set(temporaries)) == 4  # a part and a merge, twice
    assert all(f".{os.getpid()}-" in name for name in temporaries)


def test_leftover_temporaries_of_a_live_writer_are_kept(out: Path) -> None:
    """Opening deletes the temporaries that dead runs left, not one a live process may still be writing."""
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        sink = open_sink(out)
        sink.write(rows(0, 4))
        abandon(sink)
        live = [sink.parts_dir / f".part-000001.parquet.{alive.pid}-0123abcd.tmp",
                out.parent / f".{out.name}.{alive.pid}-0123abcd.tmp"]
        dead = [sink.parts_dir / f".part-000001.parquet.{gone.pid}-4567cdef.tmp",
                out.parent / f".{out.name}.{gone.pid}-4567cdef.tmp", out.parent / f".{out.name}.tmp"]
        for path in live + dead:
            path.write_bytes(b"half written")
        with open_sink(out):
            pass
        assert [path.exists() for path in live + dead] == [True, True, False, False, False]
    finally:
        alive.kill()
        alive.wait()
    assert ids_in(out) == ids_in_rows(0, 4)


# -- damaged files: found on opening, set aside, never the end of the road ----------------------------------
def corrupt_a_data_page(path: Path, header: bool = False) -> None:
    """Overwrite bytes in the middle of the caption column's first data page (or its header, for a file
    too small for its compressed data to notice): the footer stays intact."""
    file = pq.ParquetFile(path)
    chunk = file.metadata.row_group(0).column(file.schema_arrow.get_field_index("caption"))
    start = chunk.data_page_offset
    end = (chunk.dictionary_page_offset or start) + chunk.total_compressed_size
    data = bytearray(path.read_bytes())
    at = start if header else (start + end) // 2
    data[at : at + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    pq.read_schema(path)  # the footer still reads ...
    with pytest.raises((OSError, pa.ArrowException)):  # ... the rows do not
        pq.read_table(path)


def varied_rows(start: int, stop: int) -> list[dict]:
    return [{"id": f"{i:05d}", "caption": f"a cat, number {i} " * 3, "score": i / 7} for i in range(start, stop)]


def test_an_out_damaged_behind_its_footer_is_refused_on_opening_naming_recover(out: Path) -> None:
    with open_sink(out) as sink:
        sink.write(varied_rows(0, 200))
    leftover = open_sink(out)
    leftover.write(rows(200, 204))
    abandon(leftover)
    corrupt_a_data_page(out)
    damaged = out.read_bytes()
    with pytest.raises(VlmbatchError) as info:
        open_sink(out)
    message = str(info.value)
    assert f"{out} is not a readable Parquet file (" in message and "--recover" in message and "\n" not in message
    assert out.read_bytes() == damaged and len(list(leftover.parts_dir.glob("part-*.parquet"))) == 1


def test_a_flipped_bit_in_a_number_is_found_by_the_page_checksum(out: Path) -> None:
    """A float's bits decode to another float: without a checksum the damage reads back as data."""
    with open_sink(out) as sink:
        sink.write(varied_rows(0, 200))
    file = pq.ParquetFile(out)
    chunk = file.metadata.row_group(0).column(file.schema_arrow.get_field_index("score"))
    end = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size
    data = bytearray(out.read_bytes())
    data[end - 3] ^= 0x01  # inside the last page's values, far from any header or the footer
    out.write_bytes(bytes(data))
    assert pq.read_table(out).num_rows == 200  # pyarrow alone reads it, a value quietly changed
    with pytest.raises(VlmbatchError, match=r"is not a readable Parquet file \(.*CRC"):
        open_sink(out)


def test_recover_moves_a_damaged_out_aside_and_keeps_the_parts(out: Path) -> None:
    with open_sink(out) as sink:
        sink.write(varied_rows(0, 200))
    leftover = open_sink(out)
    leftover.write(rows(200, 204))
    abandon(leftover)
    corrupt_a_data_page(out)
    damaged = out.read_bytes()
    with pytest.warns(VlmbatchWarning, match=r"could not be read \(.*\): moved it to .*captions\.parquet\.corrupt-"):
        sink = open_sink(out, recover=True)
    (aside,) = out.parent.glob("captions.parquet.corrupt-*")
    assert aside.read_bytes() == damaged and not out.exists()
    assert sink.done_keys().keys() == keys(200, 204)  # the parts' rows survive; OUT's are made again
    sink.write(rows(0, 4))
    sink.close()
    assert sorted(ids_in(out)) == ids_in_rows(0, 4) + ids_in_rows(200, 204)
    with open_sink(out, recover=True):  # a readable OUT: nothing to recover
        pass
    assert len(ids_in(out)) == 8 and len(list(out.parent.glob("*.corrupt-*"))) == 1


@pytest.mark.parametrize("damage", ["garbage", "damaged page"])
def test_a_damaged_part_is_moved_aside_and_the_others_kept(out: Path, damage: str) -> None:
    sink = open_sink(out)
    sink.write(rows(0, 8))  # two parts
    abandon(sink)
    bad = sink.parts_dir / "part-000099.parquet"
    if damage == "garbage":
        bad.write_bytes(b"not parquet")
    else:
        with open_sink(bad.with_name("scratch.parquet")) as scratch:
            scratch.write(varied_rows(100, 300))
        shutil.move(bad.with_name("scratch.parquet"), bad)
        corrupt_a_data_page(bad)
    with pytest.warns(VlmbatchWarning, match=r"part file .*part-000099\.parquet could not be read .* moved it to"):
        resumed = open_sink(out)
    assert resumed.done_keys().keys() == keys(0, 8)
    resumed.close()
    assert ids_in(out) == ids_in_rows(0, 8)
    assert [p.name.split(".corrupt-")[0] for p in sink.parts_dir.iterdir()] == ["part-000099.parquet"]


def test_a_file_named_like_a_part_without_a_number_is_left_alone(out: Path) -> None:
    sink = open_sink(out)
    sink.write(rows(0, 4))
    abandon(sink)
    stray = sink.parts_dir / "part-abc.parquet"
    stray.write_bytes(b"someone's file")
    with pytest.warns(VlmbatchWarning, match=r"part-abc\.parquet is not a part file .*left alone"):
        resumed = open_sink(out)
    assert resumed.done_keys().keys() == keys(0, 4)
    resumed.write(rows(4, 8))
    resumed.close()
    assert ids_in(out) == ids_in_rows(0, 8) and stray.read_bytes() == b"someone's file"


# -- fuzz: random writes, flushes, SIGKILLs and reopenings against a model of what must be there -----------
FUZZ_SCHEMA = pa.schema([("id", pa.string()), ("value", pa.string())])
FUZZ_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import pyarrow as pa
    from vlmbatch.sinks.parquet_file import ParquetSink

    out, report = Path(sys.argv[1]), sys.argv[2]
    ops = json.load(sys.stdin)
    schema = pa.schema([("id", pa.string()), ("value", pa.string())])
    sink = ParquetSink(out, schema, key=("id",), version_column="value", settings={"fuzz": 1},
                       flush_rows=10**9, flush_seconds=10**9)
    with open(report, "a") as log:
        for index, (op, rows) in enumerate(ops):
            if op == "write":
                sink.write([{"id": key, "value": value} for key, value in rows])
                continue
            sink.flush() if op == "flush" else sink.close()
            log.write(f"{index}\\n")  # every row written before op `index` is durable: say so, durably
            log.flush()
            os.fsync(log.fileno())
            print(index, flush=True)
    """
)


def fuzz_plan(rng: random.Random, run: int) -> list[tuple[str, list]]:
    """Writes of a few rows over a small set of keys (so keys are written again: new versions), flushes,
    and a close at the end."""
    ops: list[tuple[str, list]] = []
    for index in range(rng.randint(4, 24)):
        if ops and rng.random() < 0.35:
            ops.append(("flush", []))
        else:
            written = [(f"k{rng.randrange(30):02d}", f"{run}.{index}.{j}") for j in range(rng.randint(1, 5))]
            ops.append(("write", written))
    return ops + [("close", [])]


def apply(model: dict[str, str], ops: list[tuple[str, list]], through: int) -> dict[str, str]:
    """`model` with every row that ops up to `through` (inclusive) wrote, each key's latest."""
    model = dict(model)
    for op, rows in ops[: through + 1]:
        model.update(rows)
    return model


def open_fuzz_sink(out: Path) -> ParquetSink:
    return ParquetSink(out, FUZZ_SCHEMA, key=("id",), version_column="value", settings={"fuzz": 1})


@pytest.mark.slow
def test_fuzz_random_writes_flushes_kills_and_reopenings(out: Path) -> None:
    rng = random.Random(20240528)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    model: dict[str, str] = {}  # what OUT must end up holding: each flushed key's latest value
    for run in range(16):
        ops = fuzz_plan(rng, run)
        saves = [i for i, (op, _) in enumerate(ops) if op != "write"]
        kill_after = rng.randint(0, len(saves))  # saves to see done before the kill; len(saves): no kill
        report = out.parent.parent / f"report-{run}.txt"
        child = subprocess.Popen([sys.executable, "-c", FUZZ_CHILD, str(out), str(report)], env=env, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        child.stdin.write(json.dumps(ops))
        child.stdin.close()
        if kill_after < len(saves):
            for _ in range(kill_after):
                child.stdout.readline()
            time.sleep(rng.choice([0, 0, 0.001, 0.003, 0.01]))  # at once, or somewhere in what follows
            child.send_signal(signal.SIGKILL)
        child.wait()
        stderr = child.stderr.read()
        child.stdout.close()
        child.stderr.close()
        assert child.returncode in (0, -signal.SIGKILL), stderr
        reported = [int(line) for line in report.read_text().split()] if report.exists() else []
        assert reported == saves[: len(reported)]
        last = reported[-1] if reported else -1
        # Durable for sure: every row before the last reported save. Perhaps also those up to the next
        # save, which may have returned without time to say so; never any later row.
        sure = apply(model, ops, last)
        following = next((i for i in saves if i > last), None)
        maybe = apply(model, ops, following) if following is not None else sure

        sink = open_fuzz_sink(out)  # a reopening: leftovers of the killed run cleared, parts read
        found = sink.done_keys()
        assert {key: value for (key,), value in found.items()} in (sure, maybe), f"run {run}"
        model = {key: value for (key,), value in found.items()}
        if rng.random() < 0.5:
            sink.close()
            table = pq.read_table(out)
            assert sorted(table.column("id").to_pylist()) == sorted(model)  # each key once
            assert dict(zip(table.column("id").to_pylist(), table.column("value").to_pylist())) == model
        else:
            abandon(sink)  # as if this one was killed too, before merging
    with open_fuzz_sink(out):
        pass
    table = pq.read_table(out)
    assert dict(zip(table.column("id").to_pylist(), table.column("value").to_pylist())) == model
    assert len(table) == len(model) > 0
    assert sidecars(out) == []
