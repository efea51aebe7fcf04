"""Several devices: the same code path as a multi-GPU run, exercised with two CPU workers."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from factory import broken_images, real_photos

from vlmbatch.errors import VlmbatchError
from vlmbatch.pipeline import Job, JobSpec, resolve_devices, run_job
from vlmbatch.spec import GenerationSettings


def spec(source, out, ckpt, **kw) -> JobSpec:
    return JobSpec(task="caption", source=str(source), out=out, model=str(ckpt), workers=0,
                   generation=GenerationSettings(max_new_tokens=8), batch_size=2, **kw)


def captions(path) -> dict:
    return {r["id"]: (r["caption"], r["error"]) for r in pq.read_table(path).to_pylist()}


@pytest.mark.slow
def test_two_cpu_workers_match_one_device_and_resume(tmp_path, ckpt):
    root = tmp_path / "imgs"
    root.mkdir()
    for i, image in enumerate(list(real_photos().values()) * 2):
        image.convert("RGB").rotate(17 * i).save(root / f"p{i:02d}.jpg")
    broken = broken_images(root / "bad")

    single = tmp_path / "single.parquet"
    run_job(spec(root, single, ckpt))
    multi = tmp_path / "multi.parquet"
    summary = run_job(spec(root, multi, ckpt, devices="cpu,cpu", limit=10))
    assert summary.written == 10
    summary = run_job(spec(root, multi, ckpt, devices="cpu,cpu"))  # resume in the multi-device mode
    assert summary.already_done == 10
    expected = captions(single)
    assert captions(multi) == expected
    assert sum(1 for _, error in expected.values() if error) == len(broken)


def test_device_lists_are_validated():
    assert [str(d) for d in resolve_devices("cpu, cpu")] == ["cpu", "cpu"]
    if not torch.cuda.is_available():
        with pytest.raises(VlmbatchError, match="CUDA is not available"):
            resolve_devices("cuda:0,cuda:1")
        with pytest.raises(VlmbatchError, match="needs CUDA"):
            resolve_devices("all")
    with pytest.raises(VlmbatchError, match="no device"):
        resolve_devices(" , ")


def test_a_failing_worker_stops_the_run_with_one_line(tmp_path, ckpt):
    """A worker that cannot start (here: its checkpoint vanished) must not hang the parent."""
    root = tmp_path / "imgs"
    root.mkdir()
    real_photos()["astronaut"].save(root / "a.png")
    job = Job(spec(root, tmp_path / "o.parquet", ckpt, devices="cpu,cpu"))
    job.checkpoint = type(job.checkpoint)(tmp_path / "missing-dir", "broken")  # workers fail to load it
    with pytest.raises(VlmbatchError, match="worker on cpu failed"):
        job.run()


def test_a_worker_killed_by_sigkill_is_said_to_be_most_likely_out_of_memory():
    from types import SimpleNamespace

    from vlmbatch.engine.devices import _check_alive

    _check_alive([SimpleNamespace(exitcode=None), SimpleNamespace(exitcode=0)], ["cpu", "cpu"])
    with pytest.raises(VlmbatchError, match=r"^worker on cuda:1 died \(exit code -9\) \(killed: most likely by the "
                                            r"kernel, out of memory\)$"):
        _check_alive([SimpleNamespace(exitcode=None), SimpleNamespace(exitcode=-9)], ["cuda:0", "cuda:1"])
    with pytest.raises(VlmbatchError, match=r"^worker on cpu died \(exit code 1\)$"):
        _check_alive([SimpleNamespace(exitcode=1)], ["cpu"])
