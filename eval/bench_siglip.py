"""SigLIP caption scoring: vlmbatch's dual encoder against the plain transformers script, same weights,
same (image, caption) pairs, each a whole process timed from launch to exit.

Workload: 1,000 captions of 96 distinct real photos (factory.distinct_photos, 320 px JPEGs, ~10 captions
each), scored by a random-weight checkpoint with SigLIP B/16's dimensions (both towers 768 wide, 12
layers, 12 heads, MLP 3072; 224 px, patch 16; SigLIP's spiece.model tokenizer kind, from
tests/factory.py), built once into --workdir. Real weights are not needed for speed, nor downloadable here.

  vlmbatch      decodes and embeds each distinct image once, each caption once, and scores the pairs;
  transformers  runs SiglipProcessor + SiglipModel on batches of 32 pairs, as a user would write it
                (`padding="max_length"`; input_ids without the attention mask, as the towers were trained).

Both write each pair's probability and cosine; they must agree to 1e-4. Runs alternate, --repeats times,
and the fastest of each counts: other load on the machine only ever slows a run down.

    python eval/bench_siglip.py [--workdir /tmp/vlmbatch-bench-siglip] [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
IMAGES, CAPTIONS, HF_BATCH = 96, 1000, 32
BASE = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}


def build(workdir: Path) -> None:
    """Checkpoint, JPEGs and pairs.json in `workdir`, unless an earlier run left them there."""
    if (workdir / "pairs.json").is_file():
        return
    sys.path.insert(0, str(REPO / "tests"))
    import factory

    factory.make_siglip_checkpoint(workdir / "ckpt", seed=0, tokenizer="spiece", image_size=224, patch_size=16,
                                   text={**BASE, "projection_size": 768}, vision=BASE)
    (workdir / "images").mkdir(exist_ok=True)
    paths = []
    for i, photo in enumerate(factory.distinct_photos(IMAGES)):
        paths.append(str(workdir / "images" / f"{i:03d}.jpg"))
        photo.save(paths[-1], quality=90)
    sentences = factory._corpus()
    captions = [sentences[i % len(sentences)] + (f", view {i // len(sentences)}" if i >= len(sentences) else "")
                for i in range(CAPTIONS)]
    pairs = [{"image": paths[(i * 7) % IMAGES], "caption": caption} for i, caption in enumerate(captions)]
    (workdir / "pairs.json").write_text(json.dumps(pairs))


def run_vlmbatch(workdir: Path, out: Path) -> None:
    """What `vlmbatch score` runs: the engine's Scorer over decoded images, each image embedded once."""
    import torch

    sys.path.insert(0, str(REPO))
    from vlmbatch.engine.scorer import Scorer
    from vlmbatch.sources.images import load_resized
    from vlmbatch.spec import SCORE_CPU_MATMUL

    pairs = json.loads((workdir / "pairs.json").read_text())
    scorer = Scorer(str(workdir / "ckpt"), torch.device("cpu"), cpu_matmul=SCORE_CPU_MATMUL)  # as `score` does
    images = sorted({pair["image"] for pair in pairs})
    embeds = torch.cat([scorer.image_embeds([load_resized(p, scorer.image_size) for p in images[i:i + 32]])
                        for i in range(0, len(images), 32)])
    row = {path: i for i, path in enumerate(images)}
    scores = scorer.score(embeds[[row[pair["image"]] for pair in pairs]], [pair["caption"] for pair in pairs])
    np.save(out, np.array(scores, dtype=np.float32).T)


def run_transformers(workdir: Path, out: Path) -> None:
    import torch
    from PIL import Image
    from transformers import SiglipModel, SiglipProcessor

    pairs = json.loads((workdir / "pairs.json").read_text())
    model = SiglipModel.from_pretrained(workdir / "ckpt").eval()
    processor = SiglipProcessor.from_pretrained(workdir / "ckpt")
    probs, cosines = [], []
    for start in range(0, len(pairs), HF_BATCH):
        batch = pairs[start:start + HF_BATCH]
        images = [Image.open(pair["image"]).convert("RGB") for pair in batch]
        inputs = processor(text=[pair["caption"] for pair in batch], images=images, padding="max_length",
                           truncation=True, max_length=64, return_tensors="pt")
        with torch.inference_mode():
            output = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
        probs.append(torch.sigmoid(output.logits_per_image.diagonal()))
        cosines.append((output.image_embeds * output.text_embeds).sum(-1))
    np.save(out, np.stack([torch.cat(probs).numpy(), torch.cat(cosines).numpy()]))


def timed(side: str, workdir: Path) -> tuple[float, np.ndarray]:
    out = workdir / f"{side}.npy"
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--run", side], check=True)
    return time.perf_counter() - start, np.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlmbatch-bench-siglip"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--run", choices=("vlmbatch", "transformers"), help=argparse.SUPPRESS)  # one side, timed
    args = parser.parse_args()
    if args.run:
        (run_vlmbatch if args.run == "vlmbatch" else run_transformers)(args.workdir, args.workdir / f"{args.run}.npy")
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    build(args.workdir)
    best: dict[str, float] = {}
    results: dict[str, np.ndarray] = {}
    ratios = []
    for _ in range(args.repeats):
        pair = {}
        for side in ("transformers", "vlmbatch"):
            seconds, results[side] = timed(side, args.workdir)
            pair[side] = seconds
            best[side] = min(best.get(side, seconds), seconds)
            print(f"{side:>12}: {seconds:7.1f} s", flush=True)
        ratios.append(pair["transformers"] / pair["vlmbatch"])
    diff = np.abs(results["vlmbatch"] - results["transformers"]).max(axis=1)
    figures = {"pairs": CAPTIONS, "images": IMAGES, "transformers_s": round(best["transformers"], 2),
               "vlmbatch_s": round(best["vlmbatch"], 2), "speedup": round(best["transformers"] / best["vlmbatch"], 2),
               "pair_speedups": [round(r, 2) for r in ratios], "pair_median_speedup": round(float(np.median(ratios)), 2),
               "max_abs_diff_prob": float(diff[0]), "max_abs_diff_cos": float(diff[1]),
               "mean_prob": float(results["vlmbatch"][0].mean()), "machine": platform.processor() or platform.machine()}
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if max(diff) > TOLERANCE:
        sys.exit(f"the scores differ by {max(diff):.2e} > {TOLERANCE}")


if __name__ == "__main__":
    main()
