"""`--ray`: the same job on a real local Ray instance (no mocks), with two CPU engine workers.

The instance is started once for the whole session, with 4 logical CPUs: on 2 cores, two actors of 2 CPUs
each would leave the decode tasks none and the pool would wait on them forever."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from cli_runner import invoke
from factory import real_photos

from vlmbatch.errors import VlmbatchError
from vlmbatch.jobspec import load_job_spec
from vlmbatch.pipeline import Job
from vlmbatch.spec import GenerationSettings, JobSpec, SpecError

ray = pytest.importorskip("ray")
ENGINE_ACTOR = b"ray::MapWorker(MapBatches(_EngineActor))"


@pytest.fixture(scope="session")
def ray_address():
    """The GCS address of the session's local Ray instance (subprocess drivers join it via RAY_ADDRESS)."""
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def make_folder(root: Path, count: int, start: int = 0) -> Path:
    root.mkdir(exist_ok=True)
    photos = list(real_photos().values())
    for i in range(start, start + count):
        photos[i % len(photos)].convert("RGB").rotate(i * 7).save(root / f"img{i:03d}.jpg")
    return root


@pytest.fixture()
def folder(tmp_path):
    root = make_folder(tmp_path / "images", 9)
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


def run(task, source, out, ckpt, *extra, ray_run=False, expect=0):
    cluster = ("--ray", "auto", "--ray-workers", 2) if ray_run else ("--workers", 0)
    return invoke(task, source, "--out", out, "--model", ckpt, "--max-new-tokens", 8, "--batch-size", 2,
                  "--cpu-matmul", "torch", "--quiet", *cluster, *extra, expect=expect)


def table(out: Path) -> list[dict]:
    """Every row, in key order; a folder output read as the one table Parquet readers see."""
    rows = (pads.dataset(out).to_table() if out.is_dir() else pq.read_table(out)).to_pylist()
    return sorted(rows, key=lambda r: (r["id"], r.get("question_id")))


def assert_same_rows(got: list[dict], expected: list[dict]) -> None:
    """Equal rows, but for the confidence's last bits: a row's log-probs come out of matrix products
    whose blocking depends on which rows share its batch (here on another worker), its tokens do not."""
    floats = ("mean_logprob", "min_logprob")
    assert [{k: v for k, v in row.items() if k not in floats} for row in got] == \
        [{k: v for k, v in row.items() if k not in floats} for row in expected]
    for row, other in zip(got, expected):
        for name in floats:
            assert (row[name] is None) == (other[name] is None), row["id"]
            assert row[name] is None or row[name] == pytest.approx(other[name], abs=1e-5), row["id"]


def spec(source, out, ckpt, **settings) -> JobSpec:
    return JobSpec(task="caption", source=str(source), out=str(out), model=str(ckpt), batch_size=2,
                   cpu_matmul="torch", ray="auto", ray_workers="2", **settings)


def ids_once(out: Path) -> list[str]:
    ids = [r["id"] for r in table(out)]
    assert len(ids) == len(set(ids)), "an id written twice"
    return ids


def engine_actor_pids() -> list[int]:
    """The processes of this instance's engine actors (Ray titles a worker process by its actor)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(ENGINE_ACTOR):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


# -- identical rows ---------------------------------------------------------------------------------
def as_source(kind: str, folder: Path, tmp_path: Path) -> Path:
    """The images of `folder` as a source of `kind`: the folder itself, a JSONL manifest, a dataset saved
    with `save_to_disk` (the image bytes embedded in its Arrow files), or a WebDataset tar shard."""
    files = sorted(folder.iterdir())
    if kind == "folder":
        return folder
    if kind == "manifest":
        source = tmp_path / "manifest.jsonl"
        source.write_text("".join(json.dumps({"image": str(p)}) + "\n" for p in files))
        return source
    if kind == "dataset":
        table = {"id": [p.name for p in files], "image": [{"bytes": p.read_bytes(), "path": None} for p in files]}
        datasets.Dataset.from_dict(table).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "saved")
        return tmp_path / "saved"
    with tarfile.open(tmp_path / "shard-00000.tar", "w") as tar:
        for p in files:
            tar.add(p, arcname=p.name)
    return tmp_path / "shard-00000.tar"


@pytest.mark.parametrize("kind", ["folder", "manifest", "dataset", "webdataset"])
def test_caption_rows_equal_a_local_run(ray_address, folder, tmp_path, ckpt, kind):
    source = as_source(kind, folder, tmp_path)
    run("caption", source, tmp_path / "local.parquet", ckpt)
    run("caption", source, tmp_path / "cluster", ckpt, ray_run=True)
    local, cluster = table(tmp_path / "local.parquet"), table(tmp_path / "cluster")
    assert_same_rows(cluster, local)
    assert len(cluster) == 10
    broken = [r for r in cluster if "broken" in r["id"]]  # an error row, not a failed job
    assert len(broken) == 1 and broken[0]["error"] and broken[0]["finish_reason"] == "error"
    assert sum(r["error"] is None and r["caption"] is not None for r in cluster) == 9
    local_meta, cluster_meta = (pq.read_schema(path).metadata for path in
                                (tmp_path / "local.parquet", next((tmp_path / "cluster").glob("part-*.parquet"))))
    assert cluster_meta[b"vlmbatch.settings"] == local_meta[b"vlmbatch.settings"]


def test_vqa_rows_equal_a_local_run(ray_address, folder, tmp_path, ckpt):
    questions = tmp_path / "questions.jsonl"
    lines = [{"image": p.name, "question": q, "question_id": f"{p.stem}-{i}"} for p in sorted(folder.iterdir())[:5]
             for i, q in enumerate(["what is this?", "how many people are there?"])]
    lines.append({"image": "missing.jpg", "question": "where?", "question_id": "m"})  # no such image
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run("vqa", folder, tmp_path / "local.parquet", ckpt, "--questions", questions)
    run("vqa", folder, tmp_path / "cluster", ckpt, "--questions", questions, ray_run=True)
    cluster = table(tmp_path / "cluster")
    assert_same_rows(cluster, table(tmp_path / "local.parquet"))
    assert len(cluster) == 11
    assert [r["error"] for r in cluster if r["id"] == "missing.jpg"] == ["image not found in source"]


# -- resume and faults ------------------------------------------------------------------------------
def test_a_grown_folder_sends_only_new_images_through_the_model(ray_address, tmp_path, ckpt):
    root = make_folder(tmp_path / "images", 6)
    out = tmp_path / "out"
    first = Job(spec(root, out, ckpt)).run()
    assert (first.images, first.written) == (6, 6)
    before = {r["id"]: r for r in table(out)}
    make_folder(root, 3, start=6)
    second = Job(spec(root, out, ckpt)).run()
    assert (second.images, second.written, second.already_done) == (3, 3, 6)  # images: those decoded and run
    after = {r["id"]: r for r in table(out)}
    assert sorted(ids_once(out)) == sorted(p.name for p in root.iterdir())
    assert {key: after[key] for key in before} == before


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_restarted_and_every_id_written_once(ray_address, tmp_path, ckpt):
    root = make_folder(tmp_path / "images", 48)
    out = tmp_path / "out"
    written_when_killed: list[int] = []

    def kill_one_worker(summary) -> None:  # once rows have come back: both workers are loaded and busy
        if not written_when_killed:
            pids = engine_actor_pids()
            assert len(pids) == 2, "two engine actors expected"
            os.kill(pids[0], signal.SIGKILL)
            written_when_killed.append(summary.written)

    summary = Job(spec(root, out, ckpt, generation=GenerationSettings(max_new_tokens=24))).run(kill_one_worker)
    assert written_when_killed[0] <= 16 and summary.written == 48  # killed with most of the work left
    assert sorted(ids_once(out)) == sorted(p.name for p in root.iterdir())


@pytest.mark.slow
def test_a_driver_killed_mid_run_then_rerun_writes_every_id_once(ray_address, tmp_path, make_ckpt):
    ckpt = make_ckpt("pg1_untied", "hub", image_size=56).path  # slow enough to be killed mid-run
    root = make_folder(tmp_path / "images", 96)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vlmbatch", "caption", str(root), "--out", str(out), "--model", str(ckpt),
           "--max-new-tokens", "24", "--batch-size", "1", "--flush-rows", "2", "--cpu-matmul", "torch",
           "--ray", "auto", "--ray-workers", "2", "--quiet"]
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob("part-*.parquet")) and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(ids_once(out))
    assert 0 < written < 96, "the driver should have been killed mid-way"
    subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)
    assert sorted(ids_once(out)) == sorted(p.name for p in root.iterdir())


# -- bad input --------------------------------------------------------------------------------------
def test_a_single_file_out_is_refused_in_one_line(tmp_path, folder, ckpt):
    result = run("caption", folder, tmp_path / "caps.parquet", ckpt, ray_run=True, expect=2)
    assert result.output.strip().count("\n") == 0
    assert "--out must name a Parquet dataset folder" in result.output and "caps/" in result.output


@pytest.mark.slow
def test_an_unreachable_address_is_one_line(tmp_path, folder, ckpt):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vlmbatch", "caption", str(folder), "--out", str(tmp_path / "o"),
                           "--model", str(ckpt), "--ray", "127.0.0.1:9", "--quiet"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and time.monotonic() - started < 60
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: cannot reach the Ray cluster at 127.0.0.1:9")


@pytest.mark.slow
def test_without_ray_installed_the_error_says_how_to_install_it(tmp_path, folder, ckpt):
    shim = ("import sys; sys.modules['ray'] = None; sys.argv = ['vlmbatch', *sys.argv[1:]]; "  # `import ray` fails
            "from vlmbatch.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", shim, "caption", str(folder), "--out", str(tmp_path / "o"),
                           "--model", str(ckpt), "--ray", "auto", "--quiet"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --ray needs Ray: pip install 'vlmbatch[ray]'"


def test_the_command_line_does_not_import_ray():
    probe = "import sys; from vlmbatch.cli import app; import vlmbatch.pipeline; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_settings_are_checked_as_every_setting_is(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('task = "caption"\nsource = "photos"\nout = "caps/"\nray = "auto"\nray_workers = "2-8"\n')
    assert load_job_spec(job).worker_range == (2, 8)
    assert JobSpec(task="caption", source="s", out="o/", ray="auto", ray_workers="3").worker_range == (3, 3)
    for bad in ("0", "4-2", "two", "1-"):
        with pytest.raises(SpecError, match="ray_workers must be N or MIN-MAX"):
            JobSpec(task="caption", source="s", out="o/", ray="auto", ray_workers=bad)
    with pytest.raises(SpecError, match="need ray"):
        JobSpec(task="caption", source="s", out="o/", ray_workers="2")
    with pytest.raises(SpecError, match="gpus_per_worker must be a number"):
        JobSpec(task="caption", source="s", out="o/", ray="auto", gpus_per_worker="many")


def test_a_worker_that_fails_is_one_line_naming_why(ray_address):
    from vlmbatch.distributed.ray_runner import ClusterWorker, connect, run_on_ray
    from vlmbatch.engine.devices import WorkerSpec

    class _FailingActor:  # defined here, so Ray ships it by value (the workers cannot import tests/)
        """An engine actor that cannot start: a node whose checkpoint is not the driver's."""

        def __init__(self, spec):
            raise VlmbatchError("the weights on this node are not the driver's")

    connect("auto")
    worker = ClusterWorker(WorkerSpec(None, None, None, max_slots=1, max_prompt_len=0, cpu_threads=1),
                           model="", fingerprint="", answer_column="caption", image_size=16, gpus=0)
    with pytest.raises(VlmbatchError) as failed:
        list(run_on_ray([(b"not an image", [("k", "caption en", {}, None)])], worker, (1, 1), _FailingActor))
    assert str(failed.value) == "the Ray job failed: the weights on this node are not the driver's"


def test_detect_and_segment_rows_equal_a_local_run(ray_address, tmp_path):
    """Boxes in the original pixels and masks from the driver's VAE, as a local run gives them."""
    from factory import distinct_photos, make_scripted_checkpoint
    from test_detect import SEGMENT_SCRIPT, write_random_vae

    model = make_scripted_checkpoint(tmp_path / "segmenter", SEGMENT_SCRIPT).path
    vae = write_random_vae(tmp_path / "vae-oid.npz")
    images = tmp_path / "images"
    images.mkdir()
    for (width, height), photo in zip([(64, 40), (30, 90), (48, 48)], distinct_photos(3)):
        photo.convert("RGB").resize((width, height)).save(images / f"{width}x{height}.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    common = ["--model", model, "--max-new-tokens", 64, "--batch-size", 2, "--cpu-matmul", "torch", "--quiet",
              "--objects", "cat", "--vae", vae]
    invoke("segment", images, "--out", tmp_path / "local.parquet", "--workers", 0, *common)
    invoke("segment", images, "--out", tmp_path / "cluster", "--ray", "auto", "--ray-workers", 2, *common)
    local, cluster = table(tmp_path / "local.parquet"), table(tmp_path / "cluster")
    assert [row["id"] for row in cluster] == [row["id"] for row in local] and len(cluster) == 4
    for got, expected in zip(cluster, local):
        assert {k: v for k, v in got.items() if k not in ("objects", "mean_logprob", "min_logprob")} == \
            {k: v for k, v in expected.items() if k not in ("objects", "mean_logprob", "min_logprob")}
        if expected["objects"] is None:
            assert got["objects"] is None and got["error"]
            continue
        for mine, theirs in zip(got["objects"], expected["objects"], strict=True):
            assert {k: v for k, v in mine.items() if k != "score"} == {k: v for k, v in theirs.items() if k != "score"}
            assert mine["score"] == pytest.approx(theirs["score"], abs=1e-5)
    assert all(row["objects"][0]["mask"] is not None for row in cluster if row["error"] is None)
