"""A nightly job that cannot lose or block: SIGTERM saves like Ctrl-C, a damaged output is a way out, not
a dead end (end to end, through the command line)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from factory import real_photos
from test_sinks import corrupt_a_data_page, open_sink, rows
from typer.testing import CliRunner

from vlmbatch.cli import Terminated, _sigterm_raises_terminated, app
from vlmbatch.sinks.parquet_file import ParquetSink

TERMINATED = "terminated: rows written so far are saved; run the same command to resume"


@pytest.fixture(scope="module")
def slow_ckpt(make_ckpt):
    return make_ckpt("pg1_untied", "hub", image_size=56).path  # slow enough to be stopped mid-run


@pytest.fixture()
def many(tmp_path) -> Path:
    root = tmp_path / "many"
    root.mkdir()
    photos = list(real_photos().values())
    for i in range(60):
        photos[i % len(photos)].convert("RGB").rotate(i * 6).save(root / f"img{i:03d}.jpg")
    return root


def ids(out: Path) -> list[str]:
    return pq.read_table(out).column("id").to_pylist()


@pytest.mark.slow
@pytest.mark.parametrize("to_group, flags", [(False, ["--workers", "1"]),
                                             (True, ["--workers", "1", "--devices", "cpu,cpu"])],
                         ids=["to the process, as timeout sends it", "to the group, as systemd does, two devices"])
def test_sigterm_mid_run_saves_merges_and_says_so_in_one_line(tmp_path, many, slow_ckpt, to_group, flags):
    out = tmp_path / "caps.parquet"
    cmd = [sys.executable, "-m", "vlmbatch", "caption", str(many), "--out", str(out), "--model", str(slow_ckpt),
           "--max-new-tokens", "24", "--batch-size", "2", "--flush-rows", "1000"]
    proc = subprocess.Popen(cmd + flags, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        written = 0
        for line in proc.stderr:  # progress lines, until one says a row was written (buffered: 1000 > 60)
            match = re.search(r"(\d+) rows written", line)
            if match and int(match[1]) > 0:
                written = int(match[1])
                break
        os.killpg(proc.pid, signal.SIGTERM) if to_group else proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        after = read_within(proc.stderr, seconds=20)  # a worker left behind would keep stderr open
    finally:
        stop_group(proc)
    assert written > 0, "the run should have been stopped mid-way"
    assert proc.returncode == 143 and after.splitlines() == [TERMINATED], after
    saved = ids(out)  # merged: OUT holds what was written, no part left beside it
    assert written <= len(saved) < 60 and not Path(f"{out}.parts").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caps.parquet", "many"]
    subprocess.run(cmd + ["--quiet", "--workers", "0"], check=True)
    assert sorted(ids(out)) == sorted(p.name for p in many.iterdir())  # every id exactly once


def read_within(stream, seconds: float) -> str:
    """What `stream` gives until its end, or until `seconds` have passed."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(stream), daemon=True)
    reader.start()
    reader.join(seconds)
    return "".join(got)


def stop_group(proc: subprocess.Popen) -> None:
    """Kill whatever is left of the run's process group (nothing, when the run ended as it should)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture()
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for name, image in list(real_photos().items())[:4]:
        image.convert("RGB").save(root / f"{name}.jpg")
    return root


def test_a_damaged_out_is_refused_naming_recover_and_recover_goes_on(tmp_path, folder, ckpt):
    out = tmp_path / "caps.parquet"
    runner = CliRunner()
    caption = ["caption", str(folder), "--out", str(out), "--model", str(ckpt), "--max-new-tokens", "4",
               "--workers", "0", "--quiet"]
    assert runner.invoke(app, caption).exit_code == 0
    corrupt_a_data_page(out, header=True)
    damaged = out.read_bytes()

    refused = runner.invoke(app, caption)
    assert refused.exit_code == 2 and len(refused.output.splitlines()) == 1
    assert refused.output.startswith(f"error: {out} is not a readable Parquet file (") and "--recover" in refused.output
    assert out.read_bytes() == damaged

    recovered = runner.invoke(app, [*caption, "--recover"])
    assert recovered.exit_code == 0, recovered.output
    (line,) = recovered.output.splitlines()  # said even with --quiet
    assert line.startswith(f"warning: {out} could not be read (") and ".corrupt-" in line
    (aside,) = tmp_path.glob("caps.parquet.corrupt-*")
    assert aside.read_bytes() == damaged
    assert sorted(ids(out)) == sorted(p.name for p in folder.iterdir())


def test_a_job_spec_takes_recover_from_set_or_the_flag(tmp_path, folder, ckpt):
    spec = tmp_path / "job.toml"
    spec.write_text(f'task = "caption"\nsource = "images"\nout = "alt.parquet"\nmodel = "{ckpt}"\n'
                    f'workers = 0\n[generation]\nmax_new_tokens = 4\n')
    runner = CliRunner()
    for recover in (["--set", "recover=true"], ["--recover"]):
        out = tmp_path / "alt.parquet"
        out.write_bytes(b"damaged")
        assert runner.invoke(app, ["run", str(spec), "--quiet"]).exit_code == 2
        result = runner.invoke(app, ["run", str(spec), "--quiet", *recover])
        assert result.exit_code == 0, result.output
        assert "moved it to" in result.output and len(ids(out)) == 4
        for aside in tmp_path.glob("alt.parquet.corrupt-*"):
            aside.unlink()


def sigterm_while_merging(sink: ParquetSink) -> None:
    """Make `sink` receive a SIGTERM in the middle of its merge."""
    merge = sink._merge

    def merge_receiving_sigterm(parts):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in here, inside close
        merge(parts)

    sink._merge = merge_receiving_sigterm


def test_sigterm_raises_once_and_never_cuts_a_merge_short(tmp_path):
    """The first SIGTERM stops the run; more do not cut short what its stopping does (here a clean-up,
    then the merge). One that arrives while the finished run merges its output lets it end as it would have."""
    out = tmp_path / "o.parquet"
    before = signal.getsignal(signal.SIGTERM)
    cleaned_up = False
    with _sigterm_raises_terminated() as received:
        with pytest.raises(Terminated):
            with open_sink(out, flush_rows=100) as sink:
                sigterm_while_merging(sink)
                sink.write(rows(0, 3))
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # interrupted
                finally:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.05)  # not interrupted
                    cleaned_up = True
        assert cleaned_up and received == [signal.SIGTERM] * 3
        assert ids(out) == [row["id"] for row in rows(0, 3)]
    with _sigterm_raises_terminated() as received:
        try:
            with open_sink(out, flush_rows=100) as sink:
                sigterm_while_merging(sink)
                sink.write(rows(3, 6))
        except Terminated:
            pytest.fail("a SIGTERM cut the merge short")
        assert ids(out) == [row["id"] for row in rows(0, 6)] and received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before  # put back as it was
