"""Inputs a nightly job meets and must neither lose nor block on (issue 28): file names that are not
UTF-8, FIFOs and other non-files named like images, unreadable folders, an output inside its own source,
and manifests that point outside their folder."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cli_runner import invoke
from factory import real_photos

from vlmbatch.errors import ImageDecodeError, VlmbatchWarning
from vlmbatch.jobspec import load_job_spec
from vlmbatch.sinks.parquet_file import output_files
from vlmbatch.sources.images import load_image
from vlmbatch.sources.open import open_source
from vlmbatch.sources.records import ImageRecord

NOT_UTF8 = b"x\xe9.jpg"  # Latin-1 'xé.jpg', as old Samba shares and zip extracts leave it


def photo(path: Path, index: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    list(real_photos().values())[index].convert("RGB").save(path, format="JPEG")
    return path


def caption(source, out, ckpt, *extra, expect=0):
    return invoke("caption", source, "--out", out, "--model", ckpt, "--max-new-tokens", 4, "--workers", 0,
                  *extra, expect=expect)


def rows(path) -> dict[str, dict]:
    return {row["id"]: row for row in pq.read_table(path).to_pylist()}


def summary_count(output: str, name: str) -> int:
    """A count from the summary table the CLI prints (after any progress line)."""
    table = output[output.index("vlmbatch summary"):]
    return int(re.search(rf"{name}\W+(\d+)", table).group(1))


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail, instead of hanging, when the body blocks (on opening a FIFO, say) past `seconds`."""
    def expire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- file names that are not UTF-8 ----------------------------------------------------------------
def test_undecodable_bytes_are_spelled_as_escapes_and_valid_text_is_kept():
    from vlmbatch.sources.records import readable

    assert readable(os.fsdecode(NOT_UTF8)) == "x\\xe9.jpg"
    assert readable("xé/猫.jpg") == "xé/猫.jpg" and readable("plain.jpg") == "plain.jpg"
    assert readable("lone \ud800 surrogate") == "lone \\ud800 surrogate"  # one no byte stands for
    record = ImageRecord(id=os.fsdecode(NOT_UTF8), image=os.fsdecode(NOT_UTF8))
    assert record.id == "x\\xe9.jpg" and record.image == os.fsdecode(NOT_UTF8)  # opened by its real name


def test_a_file_name_that_is_not_utf8_gets_a_row_and_the_rerun_skips_it(tmp_path, ckpt):
    folder = tmp_path / "share"
    photo(folder / "good.jpg")
    photo(Path(os.fsdecode(os.path.join(os.fsencode(folder), NOT_UTF8))), 1)
    out = tmp_path / "caps.parquet"
    caption(folder, out, ckpt, "--quiet")
    table = rows(out)
    assert set(table) == {"good.jpg", "x\\xe9.jpg"}
    assert all(row["error"] is None and row["caption"] is not None for row in table.values())
    rerun = caption(folder, out, ckpt)
    assert summary_count(rerun.output, "images processed") == 0 and summary_count(rerun.output, "rows written") == 0
    assert rows(out) == table


def test_an_error_about_a_path_that_is_not_utf8_is_valid_text(tmp_path):
    missing = os.fsdecode(os.path.join(os.fsencode(tmp_path), NOT_UTF8))
    with pytest.raises(ImageDecodeError) as info:
        load_image(missing)
    assert str(info.value) == f"file not found: {tmp_path}/x\\xe9.jpg"
    str(info.value).encode("utf-8")  # what a row needs


# -- FIFOs, sockets and devices named like images -------------------------------------------------
@pytest.fixture
def not_files(tmp_path) -> dict[str, Path]:
    """A FIFO, a socket and a character device (a link to /dev/null), each named like an image."""
    folder = tmp_path / "odd"
    folder.mkdir()
    os.mkfifo(folder / "fifo.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "socket.png"))
    (folder / "null.jpg").symlink_to("/dev/null")
    yield {"a FIFO": folder / "fifo.jpg", "a socket": folder / "socket.png", "a character device": folder / "null.jpg"}
    server.close()


def test_only_regular_files_are_opened(not_files, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(p)}) + "\n" for p in not_files.values()))
    for kind, path in not_files.items():
        singles = [record.image for record in open_source(str(path))]  # a single-file source
        walked = [r.image for r in open_source(str(path.parent)) if r.image == str(path)]
        listed = [r.image for r in open_source(str(manifest)) if r.image == str(path)]
        assert len(singles) == len(walked) == len(listed) == 1
        for image in singles + walked + listed:
            with deadline(10), pytest.raises(ImageDecodeError, match=f"^not a regular file: {kind}$"):
                load_image(image)
    with pytest.raises(ImageDecodeError, match="^not a regular file: a directory$"):
        load_image(str(tmp_path))


def test_a_fifo_named_like_an_image_is_an_error_row_not_a_hang(tmp_path, ckpt):
    folder = tmp_path / "photos"
    photo(folder / "a.jpg")
    os.mkfifo(folder / "b.jpg")
    out = tmp_path / "caps.parquet"
    command = [sys.executable, "-m", "vlmbatch", "caption", str(folder), "--out", str(out), "--model", str(ckpt),
               "--max-new-tokens", "4", "--workers", "1", "--quiet"]
    run = subprocess.Popen(command, start_new_session=True)
    try:
        assert run.wait(timeout=120) == 0
    except subprocess.TimeoutExpired:  # a regression blocks on opening the FIFO
        os.killpg(run.pid, signal.SIGKILL)  # the decode worker too, or it waits there for ever
        run.wait()
        pytest.fail("the run still waits on the FIFO")
    table = rows(out)
    assert table["b.jpg"]["error"] == "not a regular file: a FIFO" and table["b.jpg"]["caption"] is None
    assert table["a.jpg"]["error"] is None and table["a.jpg"]["caption"] is not None


# -- unreadable folders ---------------------------------------------------------------------------
class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_DAC_OVERRIDE_AND_READ_SEARCH = (1 << 1) | (1 << 2)


@contextlib.contextmanager
def permissions_enforced():
    """Make file permissions bind this thread even as root, whom chmod 000 does not stop: drop the two
    capabilities that bypass them from the thread's effective set (they stay permitted, and come back
    after). Outside Linux, or where that fails, nothing changes."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if not hasattr(libc, "capget") or libc.capget(ctypes.byref(header), data) != 0:
        yield
        return
    saved = data[0].effective
    data[0].effective &= ~_DAC_OVERRIDE_AND_READ_SEARCH
    libc.capset(ctypes.byref(header), data)
    try:
        yield
    finally:
        data[0].effective = saved
        libc.capset(ctypes.byref(header), data)


def _can_list(folder: Path) -> bool:
    try:
        os.listdir(folder)
    except PermissionError:
        return False
    return True


@pytest.fixture
def locked_folder(tmp_path):
    """tmp_path/photos with a.jpg and z.jpg readable and locked/b.jpg behind a chmod 000 folder."""
    folder = tmp_path / "photos"
    photo(folder / "a.jpg")
    photo(folder / "locked" / "b.jpg", 1)
    photo(folder / "z.jpg", 2)
    (folder / "locked").chmod(0)
    with permissions_enforced():
        if _can_list(folder / "locked"):  # (os.access would ask with root's permitted capabilities)
            pytest.skip("cannot deny reading a folder here (root, and capabilities could not be dropped)")
        yield folder
    (folder / "locked").chmod(0o755)


def test_an_unreadable_folder_is_skipped_with_a_warning_naming_it(locked_folder):
    source = open_source(str(locked_folder))
    assert source.count() == 2  # quietly: the run's own walk says it
    with pytest.warns(VlmbatchWarning) as said:
        assert [r.id for r in source] == ["a.jpg", "z.jpg"]
    assert [str(w.message) for w in said] == [
        f"cannot read folder {locked_folder / 'locked'} (Permission denied): its images are skipped"]


def test_a_run_over_an_unreadable_folder_captions_the_rest_and_says_so_in_one_line(locked_folder, tmp_path, ckpt):
    out = tmp_path / "caps.parquet"
    result = caption(locked_folder, out, ckpt)
    assert set(rows(out)) == {"a.jpg", "z.jpg"}
    said = [line for line in result.output.splitlines() if "cannot read folder" in line]
    assert said == [f"warning: cannot read folder {locked_folder / 'locked'} (Permission denied): its images are "
                    "skipped"]


# -- the output inside its own source -------------------------------------------------------------
def test_the_output_its_parts_and_its_lock_are_never_inputs(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    photo(folder / "a.jpg")
    for made_by_the_sink in ("out.jpg", "out.jpg.lock", "out.jpg.parts/part-000000.png"):
        photo(folder / made_by_the_sink)
    monkeypatch.chdir(tmp_path)
    source = open_source(str(folder), exclude=output_files("photos/../photos/out.jpg"))  # spelled another way
    assert [r.id for r in source] == ["a.jpg"] and source.count() == 1
    assert [r.id for r in open_source(str(folder))] == ["a.jpg", "out.jpg", "out.jpg.parts/part-000000.png"]


@pytest.mark.parametrize("name", ["caps.parquet", "caps.jpg"])
def test_an_output_inside_the_source_folder_is_not_read_back(tmp_path, ckpt, name):
    """Images only in subfolders, so that an output beside them would otherwise turn the folder into a
    manifest folder; or an output named like an image, which would otherwise be captioned."""
    folder = tmp_path / "photos"
    photo(folder / "2024" / "a.jpg")
    photo(folder / "2025" / "b.jpg", 1)
    out = folder / name
    caption(folder, out, ckpt, "--quiet")
    caption(folder, out, ckpt, "--quiet")
    photo(folder / "2025" / "c.jpg", 2)
    rerun = caption(folder, out, ckpt)
    assert summary_count(rerun.output, "images processed") == 1
    assert set(rows(out)) == {"2024/a.jpg", "2025/b.jpg", "2025/c.jpg"}


# -- progress -------------------------------------------------------------------------------------
def test_a_folder_source_counts_its_images_for_the_progress_total(tmp_path):
    folder = tmp_path / "photos"
    for name in ("a.jpg", "sub/b.png", ".hidden/c.jpg", "notes.txt"):
        photo(folder / name)
    source = open_source(str(folder))
    assert source.size is None and source.count() == len(list(source)) == 2


def test_a_log_ends_with_a_progress_line_that_agrees_with_the_summary(tmp_path, ckpt):
    folder = tmp_path / "photos"
    for i in range(3):
        photo(folder / f"{i}.jpg", i)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "caps.parquet"
    caption(folder, out, ckpt, "--limit", 2)  # the next run skips these two
    result = caption(folder, out, ckpt)
    lines = [line for line in result.output.splitlines() if line.startswith("caption: ")]
    match = re.fullmatch(r"caption: (\d+)/4 images \((\d+) processed, (\d+) skipped\), (\d+) rows written, "
                         r"(\d+) errors, [\d.]+ rows/s(, [\d:]+ left)?", lines[-1])
    assert match, lines
    seen, processed, skipped, written, errors = map(int, match.groups()[:5])
    assert (seen, processed, skipped) == (4, 2, 2)
    assert processed == summary_count(result.output, "images processed")
    assert written == summary_count(result.output, "rows written") == 2
    assert errors == summary_count(result.output, "errors") == 1
    assert result.output.index(lines[-1]) < result.output.index("vlmbatch summary")


# -- manifests pointing outside their folder ------------------------------------------------------
@pytest.fixture
def escaping_manifest(tmp_path) -> Path:
    """data/m.jsonl listing one image inside data/ and four that lie outside it: by '../', by an
    absolute path, by a symlinked file and by a symlinked folder."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    photo(data / "images" / "in.jpg")
    photo(outside / "secret.jpg", 1)
    (data / "link.jpg").symlink_to(outside / "secret.jpg")
    (data / "linked").symlink_to(outside, target_is_directory=True)
    listed = ["images/in.jpg", "../outside/secret.jpg", str(outside / "secret.jpg"), "link.jpg", "linked/secret.jpg"]
    (data / "m.jsonl").write_text("".join(json.dumps({"id": str(i), "image": p}) + "\n" for i, p in enumerate(listed)))
    return data / "m.jsonl"


def test_manifest_paths_are_trusted_by_default_and_confined_on_request(escaping_manifest):
    trusted = {r.id: load_image(r.image).size for r in open_source(str(escaping_manifest))}
    assert len(trusted) == 5
    confined = list(open_source(str(escaping_manifest), confine=True))
    assert load_image(confined[0].image).size == trusted["0"]
    folder = os.path.realpath(escaping_manifest.parent)
    listed = [json.loads(line)["image"] for line in escaping_manifest.read_text().splitlines()]
    for record, image in zip(confined[1:], listed[1:]):
        with pytest.raises(ImageDecodeError) as info:
            load_image(record.image)
        assert str(info.value) == f"outside the manifest folder {folder}: {image}"


def test_confine_makes_error_rows_of_paths_outside_the_manifest_folder(escaping_manifest, tmp_path, ckpt):
    trusted, confined = tmp_path / "trusted.parquet", tmp_path / "confined.parquet"
    caption(escaping_manifest, trusted, ckpt, "--quiet")
    assert all(row["error"] is None for row in rows(trusted).values()) and len(rows(trusted)) == 5
    caption(escaping_manifest, confined, ckpt, "--quiet", "--confine")
    table = rows(confined)
    assert table["0"]["error"] is None and table["0"]["caption"] == rows(trusted)["0"]["caption"]
    for key in "1234":
        assert table[key]["error"].startswith("outside the manifest folder ") and table[key]["caption"] is None


def test_a_job_spec_takes_confine(tmp_path):
    spec = tmp_path / "nightly.toml"
    spec.write_text('task = "caption"\nsource = "m.jsonl"\nout = "caps.parquet"\nconfine = true\n')
    assert load_job_spec(spec).confine is True
    spec.write_text('task = "caption"\nsource = "m.jsonl"\nout = "caps.parquet"\n')
    assert load_job_spec(spec).confine is False
