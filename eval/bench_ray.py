"""Benchmark: `vlmbatch caption --ray auto` against the local run, and the Ray runner's scaling.

What is measured
    overhead: the CPU workload of eval/bench_throughput.py (a 24M-parameter PaliGemma, 224 px, float32,
        96 distinct photos (--images), <= 32 new tokens, greedy, --batch-size 16) through three whole
        processes, alternating, each from launch to exit:
          local:       python3 -m vlmbatch caption FOLDER --out X.parquet --model CKPT ... --quiet
          ray:         python3 -m vlmbatch caption FOLDER --out X/ --model CKPT ... --ray auto --quiet,
                       no cluster running: it starts a local Ray instance (part of the measured time)
          ray_running: the same, joining an instance `ray start --head` began before the timed run
        One CPU engine worker using every core. Reported: images/s of each (the fastest of --repeats)
        and each ray kind / local. Goal: >= 0.85 (orchestration costs at most 15 %).
    scaling: the Ray runner's own pipeline (shards -> decode tasks -> actor pool -> driver) with an
        actor whose "engine" sleeps a fixed time per image instead of computing, so its actors need no
        cores: images/s with 1, 2, 4, 8 and 16 workers on this machine, from the first batch an actor
        began to the last row back (actor start-up left out), against workers x (1 / seconds per
        image). Goal: within 10 % of linear. What a GPU cluster would give: N GPUs x one GPU's images/s (eval/RESULTS.md) times the
        efficiency measured here.

Run it from the repository root (needs `pip install '.[ray]'`):
    python3 eval/bench_ray.py --scaling                 # about a minute
    python3 eval/bench_ray.py --overhead --repeats 2    # several minutes on 2 cores
    python3 eval/bench_ray.py --overhead --images 384   # the fixed costs amortized
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL_RATIO = 0.85
GOAL_LINEAR = 0.90
WORKERS = (1, 2, 4, 8, 16)
# local: the one-machine run; ray: --ray auto starting its own instance (its start is part of the time);
# ray_running: --ray auto joining an instance `ray start` began beforehand, as on a cluster.
KINDS = ("local", "ray", "ray_running")


# -- overhead -----------------------------------------------------------------------------------------
def overhead(work: Path, repeats: int, images: int) -> dict:
    from bench_throughput import CPU, DEFAULT_EOS_BOOST, build_checkpoint, build_folder

    checkpoint, folder = work / "ckpt", work / f"photos-{images}"
    if not checkpoint.exists():
        build_checkpoint(CPU, checkpoint, seed=0, eos_boost=DEFAULT_EOS_BOOST)
    if not folder.exists():
        build_folder(folder, images)
    base = [sys.executable, "-m", "vlmbatch", "caption", str(folder), "--model", str(checkpoint),
            "--max-new-tokens", "32", "--batch-size", str(CPU.batch_size), "--quiet"]
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    subprocess.run(["ray", "stop"], capture_output=True, check=False)
    for run in range(repeats):
        for kind in KINDS:
            out = work / f"{kind}-{run}{'.parquet' if kind == 'local' else ''}"
            extra = [] if kind == "local" else ["--ray", "auto"]
            if kind == "ray_running":  # started outside the timed run, as a cluster's would be
                subprocess.run(["ray", "start", "--head", "--include-dashboard=false", "--disable-usage-stats"],
                               capture_output=True, check=True)
            began = time.perf_counter()
            subprocess.run([*base, "--out", str(out), *extra], check=True, env=env, stderr=subprocess.DEVNULL)
            seconds[kind].append(time.perf_counter() - began)
            if kind == "ray_running":
                subprocess.run(["ray", "stop"], capture_output=True, check=True)
            print(f"  {kind}: {seconds[kind][-1]:.1f} s", flush=True)
    rates = {kind: images / min(values) for kind, values in seconds.items()}
    return {"images": images, "seconds": seconds, "images_per_second": rates,
            "ratio": {kind: rates[kind] / rates["local"] for kind in KINDS[1:]}}


# -- scaling ------------------------------------------------------------------------------------------
class SleepingEngine:
    """An engine actor that takes `seconds_per_image` per image and makes an empty row for each."""

    seconds_per_image = 0.05

    def __init__(self, spec) -> None:
        self.spec = spec

    def __call__(self, batch: dict) -> dict:
        started = time.time()  # one machine: the driver reads the same clock
        time.sleep(self.seconds_per_image * len(batch["item"]))
        row = {"pid": os.getpid(), "started": started, "ended": time.time(), "images": len(batch["item"])}
        return {"rows": [pickle.dumps([row]) for _ in batch["item"]]}


def scaling(shards_per_worker: int) -> list[dict]:
    import ray

    from vlmbatch.distributed.ray_runner import SHARD_IMAGES, ClusterWorker, connect
    from vlmbatch.engine.devices import WorkerSpec

    ray.init(num_cpus=64, include_dashboard=False, log_to_driver=False)  # actors that sleep need no cores
    connect("auto")
    worker = ClusterWorker(WorkerSpec(None, None, None, max_slots=2, max_prompt_len=0, cpu_threads=1),
                           model="", fingerprint="", answer_column="caption", image_size=16, gpus=0)
    results = []
    for workers in WORKERS:
        n = shards_per_worker * workers * SHARD_IMAGES
        batches, last = _batches(worker, workers, n)
        linear = workers / SleepingEngine.seconds_per_image
        # whole: from the first batch an actor began to the last row back at the driver. On one machine
        # the actors start one after another (each a Python process on the same 2 cores), so this counts
        # the later ones' start-up; on a cluster they start on their own nodes, side by side.
        whole = n / (last - min(b["started"] for b in batches))
        steady = _steady_rate(batches)
        results.append({"workers": workers, "images": n, "linear": linear, "images_per_second": whole,
                        "efficiency": whole / linear, "steady_images_per_second": steady,
                        "steady_efficiency": None if steady is None else steady / linear})
        shown = "n/a" if steady is None else f"{steady / linear:.1%}"
        print(f"  {workers:2d} workers: whole {whole:7.1f} images/s ({whole / linear:.1%}), all actors busy "
              f"{shown}, linear {linear:6.1f}", flush=True)
    ray.shutdown()
    return results


def _batches(worker, workers: int, images: int) -> tuple[list[dict], float]:
    """Each batch an actor ran (pid, began, ended, images), and when the last row reached the driver."""
    from PIL import Image

    from vlmbatch.distributed.ray_runner import run_on_ray

    png = io.BytesIO()
    Image.new("RGB", (16, 16), "gray").save(png, format="PNG")
    todo = [(png.getvalue(), [(f"img{i}", "caption en", {}, None)]) for i in range(images)]
    rows = [rows[0] for rows in run_on_ray(todo, worker, (workers, workers), SleepingEngine)]
    last = time.time()
    return list({(r["pid"], r["started"]): r for r in rows}.values()), last


def _steady_rate(batches: list[dict]) -> float | None:
    """Images per second while every actor was at work: from the moment the last actor began its first
    batch to the moment the first actor ended its last one, each batch counted in proportion to its
    time inside that window (None when no such window exists: too few batches per actor)."""
    by_actor: dict[int, list[dict]] = {}
    for batch in batches:
        by_actor.setdefault(batch["pid"], []).append(batch)
    begin = max(min(b["started"] for b in runs) for runs in by_actor.values())
    end = min(max(b["ended"] for b in runs) for runs in by_actor.values())
    if end <= begin:
        return None
    inside = sum(b["images"] * max(0.0, min(b["ended"], end) - max(b["started"], begin)) / (b["ended"] - b["started"])
                 for b in batches)
    return inside / (end - begin)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overhead", action="store_true", help="--ray auto against the local run")
    parser.add_argument("--scaling", action="store_true", help="the simulated actor pool, 1 to 16 workers")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--images", type=int, default=96, help="--overhead: photos in the folder (default 96, "
                        "issue 5's workload; more amortizes the fixed costs)")
    parser.add_argument("--shards-per-worker", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=None, help="kept between runs (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = args.workdir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        if args.scaling or not args.overhead:
            print("scaling (simulated engine, 50 ms per image):")
            result["scaling"] = scaling(args.shards_per_worker)
            worst = min((r["steady_efficiency"] or 0) for r in result["scaling"])
            print(f"  worst, all actors busy: {worst:.1%} of linear (goal >= {GOAL_LINEAR:.0%})")
        if args.overhead:
            print(f"overhead ({args.repeats} alternating runs each):")
            result["overhead"] = overhead(work, args.repeats, args.images)
            o = result["overhead"]
            rates = ", ".join(f"{kind} {rate:.2f}" for kind, rate in o["images_per_second"].items())
            ratios = ", ".join(f"{kind}/local {ratio:.2f}" for kind, ratio in o["ratio"].items())
            print(f"  images/s: {rates}; {ratios} (goal >= {GOAL_RATIO})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
