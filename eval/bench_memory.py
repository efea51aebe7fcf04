"""Benchmark: a 100k-image folder streams through `vlmbatch caption` with flat host memory.

What is measured
    The resident memory (VmRSS) of one `python3 -m vlmbatch caption FOLDER ...` process and of all
    its descendants (the image-decoding workers), sampled every `--interval` seconds from
    /proc/PID/status while it captions a folder of N images (default 100,000), against its progress.

How
    * The folder is synthetic and cheap: 8 small real JPEGs (tests/factory.py's photos) hard-linked
      N times under nested directories, 1,000 files per directory (symlinks where hard links fail).
    * The model is a tiny random PaliGemma (28 px, so 4 image tokens; a 2-layer Gemma of width 64) with
      `--max-new-tokens 2`: the model costs little, so the run exercises what grows with N (folder walk,
      decode queue, sink, resume bookkeeping) rather than the matrix multiplies.
    * Progress is the number of rows in the sink's flushed part files (`OUT.parts/part-*.parquet`,
      their Parquet footers are read once each); it lags the model by at most one flush (`--flush-rows`,
      256 by default as in vlmbatch).
    * Reported: tree RSS (main + workers) and main-process RSS at 10 %, 50 % and 90 % of progress, the
      peaks, and the least-squares slope of RSS against images over the samples taken between 10 % and
      95 % of progress (after warm-up, before the workers exit and the parts are merged), in MB per
      10k images. Flat means that slope is about 0; the verdict line uses |slope| <= 5 MB per 10k
      images (50 MB over 100k). With --ray (`--ray auto`, a dataset folder as OUT) the verdict is the
      driver's own slope: the tree then holds Ray's processes, which are Ray's to manage.

Run it from the repository root:
    python3 eval/bench_memory.py                      # 100,000 images
    python3 eval/bench_memory.py --images 20000 --json mem.json
    python3 eval/bench_memory.py --ray                # the Ray driver (needs '.[ray]')

This file also holds the process-measuring helpers (`run_measured`, `RssSampler`, `machine_info`) that
eval/bench_throughput.py imports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
FLAT_MB_PER_10K = 5.0


# -- measuring a process ----------------------------------------------------------------------------
def _parent_map() -> dict[int, int]:
    """pid → parent pid of every process, from /proc/PID/stat."""
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
        parents[int(entry.name)] = int(stat[stat.rindex(b")") + 2:].split()[1])
    return parents


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, parent in _parent_map().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid`, 0 if it is gone (or a zombie, which has no VmRSS line)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Sample:
    t: float  # seconds since the process started
    main: int  # RSS bytes of the process itself
    children: int  # RSS bytes of all its descendants together
    progress: int | None = None

    @property
    def tree(self) -> int:
        return self.main + self.children


class RssSampler(threading.Thread):
    """Samples the RSS of a process and of its descendants every `interval` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 1.0, progress: Callable[[], int] | None = None):
        super().__init__(daemon=True)
        self.pid, self.interval, self.progress = pid, interval, progress
        self.samples: list[Sample] = []
        self._done = threading.Event()
        self._t0 = time.perf_counter()

    def run(self) -> None:
        while True:
            main = rss_bytes(self.pid)
            children = sum(rss_bytes(p) for p in descendants(self.pid))
            progress = self.progress() if self.progress else None
            if main:
                self.samples.append(Sample(time.perf_counter() - self._t0, main, children, progress))
            if self._done.wait(self.interval):
                return

    def stop(self) -> None:
        self._done.set()
        self.join()

    @property
    def peak_tree(self) -> int:
        return max((s.tree for s in self.samples), default=0)

    @property
    def peak_main(self) -> int:
        return max((s.main for s in self.samples), default=0)


@dataclass
class Measured:
    """One finished subprocess: wall-clock seconds, exit code, memory."""

    command: list[str]
    seconds: float
    returncode: int
    max_rss: int  # bytes: kernel's ru_maxrss from wait4 (the largest single process of the tree)
    samples: list[Sample] = field(default_factory=list)
    log: str = ""

    @property
    def peak_tree_rss(self) -> int:
        """Largest sampled sum of RSS over the process and its descendants."""
        return max((s.tree for s in self.samples), default=0)


def run_measured(command: list[str], *, log_path: Path, interval: float = 0.5, env: dict | None = None,
                 progress: Callable[[], int] | None = None) -> Measured:
    """Run `command` from the repository root, stdout+stderr to `log_path`, sampling its memory."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = RssSampler(proc.pid, interval, progress)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(command, seconds, proc.returncode, usage.ru_maxrss * 1024, sampler.samples,
                    Path(log_path).read_text(errors="replace"))


def check(measured: Measured) -> None:
    if measured.returncode != 0:
        tail = "\n".join(measured.log.splitlines()[-30:])
        raise SystemExit(f"command failed ({measured.returncode}): {' '.join(measured.command)}\n{tail}")


def machine_info() -> dict:
    """CPU model, cores, library versions, accelerator: what a reader needs to judge the figures."""
    import torch

    fields = {}
    try:  # the first processor's lines; a VM may name its CPU only "AMD EPYC": family and model tell more
        for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    info = {"cpu": fields.get("model name", "unknown"), "cpu_family": fields.get("cpu family"),
            "cpu_model": fields.get("model"),
            "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
            "device": "cpu"}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = f"cuda: {_gpu_name()}"
    return info


def _gpu_name() -> str:
    """The GPU's name from nvidia-smi, so that this process never creates a CUDA context of its own."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30, check=False).stdout.split("\n")
        return names[0].strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def factory():
    """tests/factory.py (random checkpoints, real photos); a bench-only dependency, like transformers."""
    sys.path.insert(0, str(REPO / "tests"))
    import factory as module

    return module


# -- the workload ------------------------------------------------------------------------------------
def build_folder(root: Path, n: int, sources: int = 8, per_dir: int = 1000) -> Path:
    """`n` image files under root/images/dNNN/, hard links (or symlinks) to `sources` small JPEGs."""
    originals = root / "originals"
    originals.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, photo in enumerate(factory().distinct_photos(sources, size=96)):
        paths.append(originals / f"photo{i}.jpg")
        photo.save(paths[-1], quality=90)
    folder = root / "images"
    shutil.rmtree(folder, ignore_errors=True)  # a reused --workdir: exactly n images, built afresh
    for i in range(n):
        sub = folder / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            sub.mkdir(parents=True)
        target, link = paths[i % sources], sub / f"img{i:07d}.jpg"
        try:
            os.link(target, link)
        except OSError:
            link.symlink_to(target)
    return folder


def build_tiny_checkpoint(path: Path) -> Path:
    factory().make_checkpoint(path, "pg1_untied", image_size=28, seed=0, eos_boost=2.3)
    return path


class PartRows:
    """Rows flushed so far by the sink: the row counts of its part files, each read once
    (OUT.parts/part-*.parquet for a single-file OUT, OUT/part-*.parquet for a dataset folder)."""

    def __init__(self, out: Path, folder: bool = False):
        self.parts = out if folder else out.with_name(out.name + ".parts")
        self.counted: dict[str, int] = {}

    def __call__(self) -> int:
        import pyarrow.parquet as pq

        try:
            names = [e.name for e in os.scandir(self.parts) if e.name.startswith("part-") and e.name.endswith(".parquet")]
        except OSError:
            names = []
        for name in names:
            if name not in self.counted:
                try:
                    self.counted[name] = pq.read_metadata(self.parts / name).num_rows
                except OSError:
                    pass  # deleted by the final merge meanwhile
        return sum(self.counted.values())


# -- analysis ----------------------------------------------------------------------------------------
def at_progress(samples: list[Sample], done: int) -> Sample | None:
    return next((s for s in samples if s.progress is not None and s.progress >= done), None)


def slope_per_10k(samples: list[Sample], value: Callable[[Sample], int]) -> float | None:
    """Least-squares slope of value (MB) against progress (images), in MB per 10,000 images."""
    points = [(s.progress, value(s) / MB) for s in samples]
    if len(points) < 3 or len({x for x, _ in points}) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return sxy / sxx * 10_000


def analyse(measured: Measured, n: int, main_only: bool = False) -> dict:
    samples = [s for s in measured.samples if s.progress is not None]
    # After warm-up, and before the end (workers exit, the parts are merged into the output).
    steady = [s for s in samples if 0.1 * n <= s.progress <= 0.95 * n]
    marks = {}
    for fraction in (0.1, 0.5, 0.9):
        s = at_progress(samples, int(fraction * n))
        marks[f"{int(fraction * 100)}%"] = None if s is None else {
            "images": s.progress, "seconds": round(s.t, 1), "tree_rss_mb": round(s.tree / MB, 1),
            "main_rss_mb": round(s.main / MB, 1), "workers_rss_mb": round(s.children / MB, 1)}
    tree_slope = slope_per_10k(steady, lambda s: s.tree)
    main_slope = slope_per_10k(steady, lambda s: s.main)
    judged = main_slope if main_only else tree_slope  # with Ray, the tree holds Ray's own processes
    return {
        "rss_at_progress": marks,
        "slope_tree_mb_per_10k_images": None if tree_slope is None else round(tree_slope, 2),
        "slope_main_mb_per_10k_images": None if main_slope is None else round(main_slope, 2),
        "steady_samples": len(steady),
        "peak_tree_rss_mb": round(measured.peak_tree_rss / MB, 1),
        "peak_main_rss_mb": round(max((s.main for s in measured.samples), default=0) / MB, 1),
        "max_rss_mb_wait4": round(measured.max_rss / MB, 1),
        "flat": None if judged is None else abs(judged) <= FLAT_MB_PER_10K,
    }


# -- main --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100_000, help="images in the synthetic folder (default 100000)")
    p.add_argument("--batch-size", type=int, default=32, help="vlmbatch --batch-size (KV-cache slots)")
    p.add_argument("--max-new-tokens", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="vlmbatch --workers (default: its own)")
    p.add_argument("--flush-rows", type=int, default=256, help="vlmbatch --flush-rows: rows per part file, "
                   "so also the grain of the progress measure (default 256, vlmbatch's own)")
    p.add_argument("--ray", action="store_true", help="run with --ray auto (a local Ray instance) into a dataset "
                   "folder; the verdict is then the driver's own RSS (Ray's processes are not vlmbatch's)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples")
    p.add_argument("--workdir", type=Path, default=None, help="keep the folder, checkpoint and output here")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        folder = build_folder(work, args.images)
        checkpoint = build_tiny_checkpoint(work / "checkpoint")
        print(f"built {args.images} images and a tiny checkpoint in {time.perf_counter() - started:.1f} s", flush=True)

        out = work / ("captions" if args.ray else "captions.parquet")
        command = [sys.executable, "-m", "vlmbatch", "caption", str(folder), "--out", str(out),
                   "--model", str(checkpoint), "--max-new-tokens", str(args.max_new_tokens),
                   "--batch-size", str(args.batch_size), "--flush-rows", str(args.flush_rows), "--overwrite", "--quiet"]
        if args.workers is not None:
            command += ["--workers", str(args.workers)]
        if args.ray:
            command += ["--ray", "auto"]
        print("running:", " ".join(command), flush=True)
        measured = run_measured(command, log_path=work / "vlmbatch.log", interval=args.interval,
                                progress=PartRows(out, folder=args.ray))
        check(measured)
        import pyarrow.parquet as pq

        rows = (sum(pq.read_metadata(f).num_rows for f in out.glob("part-*.parquet")) if args.ray
                else pq.read_metadata(out).num_rows)
        result = {
            "benchmark": "memory",
            "workload": {"images": args.images, "ray": args.ray, "rows_written": rows, "model": "tiny PaliGemma, 28 px (4 image tokens)",
                         "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "flush_rows": args.flush_rows,
                         "sample_interval_s": args.interval, "command": " ".join(command)},
            "machine": machine_info(),
            "seconds": round(measured.seconds, 1),
            "images_per_second": round(args.images / measured.seconds, 1),
            **analyse(measured, args.images, main_only=args.ray),
            "samples": [[round(s.t, 2), s.progress, s.main, s.children] for s in measured.samples],
        }
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(r: dict) -> None:
    w = r["workload"]
    print(f"\n== vlmbatch caption over {w['images']} images ({w['model']}, {w['max_new_tokens']} new tokens)")
    print(f"machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}")
    print(f"{r['seconds']} s, {r['images_per_second']} images/s, {w['rows_written']} rows written")
    print(f"{'progress':>9} {'images':>8} {'tree RSS':>10} {'main':>8} {'workers':>8}")
    for mark, s in r["rss_at_progress"].items():
        if s:
            print(f"{mark:>9} {s['images']:>8} {s['tree_rss_mb']:>7.1f} MB {s['main_rss_mb']:>5.1f} MB "
                  f"{s['workers_rss_mb']:>5.1f} MB")
    print(f"peak tree RSS {r['peak_tree_rss_mb']} MB (main {r['peak_main_rss_mb']} MB)")
    print(f"slope after warm-up ({r['steady_samples']} samples): tree {r['slope_tree_mb_per_10k_images']} MB, "
          f"main {r['slope_main_mb_per_10k_images']} MB per 10k images")
    verdict = {True: "FLAT", False: "GROWING", None: "too few samples to tell"}[r["flat"]]
    print(f"goal: flat host memory (|slope| <= {FLAT_MB_PER_10K} MB per 10k images): {verdict}")


if __name__ == "__main__":
    main()
