"""Caption-scoring speed: pycocoevalcap's components used the plain way vs `score_captions`, same data.

The workload is COCO-Karpathy-test sized (5,000 images) and made of real captions: COCO val2014's
annotations ship inside pycocoevalcap's `spice/spice-1.0.jar`. For each image one human caption plays the
prediction and the other four or more are the references.

(a) times each component as `COCOEvalCap.evaluate()` runs them -- the PTB tokenizer twice (references,
then predictions), BLEU, METEOR (JVM start included), ROUGE-L, CIDEr -- and sums them; (b) times
`score_captions` end to end (all metrics but SPICE). It checks that both give the same numbers (1e-4),
and also reports CPU seconds (this process plus its Java children), which other load does not distort.

    python eval/bench_scoring.py [--images 5000] [--repeat 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmbatch.evaluation.metrics.captions import score_captions  # noqa: E402
from vlmbatch.evaluation.metrics.spice import pycocoevalcap_spice_dir  # noqa: E402

TOLERANCE = 1e-4


def build_workload(images: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(references, predictions) for `images` evenly spaced COCO val2014 images."""
    with zipfile.ZipFile(pycocoevalcap_spice_dir() / "spice-1.0.jar") as jar:
        data = json.loads(jar.read("coco/annotations/captions_val2014.json"))
    captions: dict[str, list[str]] = {}
    for annotation in data["annotations"]:
        captions.setdefault(str(annotation["image_id"]), []).append(annotation["caption"])
    ids = sorted(captions, key=int)[:: max(1, len(captions) // images)][:images]
    return ({image_id: captions[image_id][1:] for image_id in ids},
            {image_id: captions[image_id][0] for image_id in ids})


def _clock(timings: dict[str, float], name: str, run: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = run()
    timings[name] = time.perf_counter() - start
    return result


def time_reference(references: dict[str, list[str]], predictions: dict[str, str]) -> tuple[dict, dict]:
    """Each pycocoevalcap component timed separately, as COCOEvalCap.evaluate() runs them."""
    timings: dict[str, float] = {}
    tokenizer = PTBTokenizer()
    gts = _clock(timings, "tokenize references",
                 lambda: tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()}))
    res = _clock(timings, "tokenize predictions",
                 lambda: tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references}))
    scores: dict[str, float] = {}
    bleu, _ = _clock(timings, "BLEU", lambda: Bleu(4).compute_score(gts, res, verbose=0))
    scores.update({f"Bleu_{n + 1}": bleu[n] for n in range(4)})
    scores["METEOR"], _ = _clock(timings, "METEOR", lambda: Meteor().compute_score(gts, res))
    scores["ROUGE_L"], _ = _clock(timings, "ROUGE_L", lambda: Rouge().compute_score(gts, res))
    scores["CIDEr"], _ = _clock(timings, "CIDEr", lambda: Cider().compute_score(gts, res))
    return timings, {name: float(value) for name, value in scores.items()}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the Java scorers), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_once(references: dict[str, list[str]], predictions: dict[str, str]) -> dict[str, Any]:
    """One measurement of both sides, back to back, with wall and CPU seconds."""
    cpu = _cpu_seconds()
    reference_times, reference_scores = time_reference(references, predictions)
    reference_cpu, cpu = _cpu_seconds() - cpu, _cpu_seconds()
    start = time.perf_counter()
    ours = score_captions(references, predictions, metrics=("Bleu", "METEOR", "ROUGE_L", "CIDEr"))
    ours_total, ours_cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    reference_sum = sum(reference_times.values())
    return {
        "reference_seconds": reference_times, "reference_sum_seconds": reference_sum,
        "reference_cpu_seconds": reference_cpu, "score_captions_seconds": ours_total,
        "score_captions_cpu_seconds": ours_cpu, "score_captions_stages": ours.timings,
        "ratio": ours_total / reference_sum, "reference_scores": reference_scores,
        "score_captions_scores": ours.corpus,
        "max_abs_difference": max(abs(ours.corpus[name] - value) for name, value in reference_scores.items()),
    }


def print_run(console: Console, images: int, run: dict[str, Any]) -> None:
    table = Table(title=f"Caption scoring, {images:,} images (seconds)")
    table.add_column("pycocoevalcap component")
    table.add_column("time", justify="right")
    for name, seconds in run["reference_seconds"].items():
        table.add_row(name, f"{seconds:.2f}")
    table.add_row("[bold]sum[/bold]", f"[bold]{run['reference_sum_seconds']:.2f}[/bold]")
    table.add_row("[bold]score_captions, end to end[/bold]", f"[bold]{run['score_captions_seconds']:.2f}[/bold]")
    console.print(table)
    stages = ", ".join(f"{name} {seconds:.2f}" for name, seconds in run["score_captions_stages"].items())
    console.print(f"score_captions stages (overlapping): {stages}")
    console.print(f"CPU seconds: components {run['reference_cpu_seconds']:.1f}, "
                  f"score_captions {run['score_captions_cpu_seconds']:.1f}")
    worst = run["max_abs_difference"]
    console.print(f"ratio (score_captions / sum of components): {run['ratio']:.2f}; largest score difference "
                  f"{worst:.2e} ({'agree' if worst <= TOLERANCE else 'DISAGREE'} within {TOLERANCE:g})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="workload size (default: 5000, COCO Karpathy test)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure both sides this many times, alternating (timings on a shared machine are noisy)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    console = Console()

    references, predictions = build_workload(args.images)
    console.print(f"{len(references):,} images, {sum(map(len, references.values())):,} references, "
                  f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    runs = []
    for _ in range(args.repeat):
        runs.append(run_once(references, predictions))
        print_run(console, len(references), runs[-1])
    ratios = sorted(run["ratio"] for run in runs)
    if len(runs) > 1:
        console.print(f"ratios: {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "images": len(references), "cpus": os.cpu_count(), "python": platform.python_version(),
            "median_ratio": statistics.median(ratios), "runs": runs}, indent=2) + "\n")
    return 0 if all(run["max_abs_difference"] <= TOLERANCE for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
