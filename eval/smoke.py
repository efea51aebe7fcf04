"""The whole path without Hub access: a tiny random checkpoint, a few photos, the nightly job spec, twice.

    pip install -e '.[dev]'      # the test extras: the checkpoint is built with transformers
    python3 eval/smoke.py [--workdir smoke]

The captions are noise: the weights are random. What it shows is that the folder source, the job spec,
the Parquet output and resume work on this machine: the second run finds nothing new and loads no model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("smoke"), help="where the checkpoint, photos and output go")
    parser.add_argument("--images", type=int, default=8, help="sample photos to caption")
    args = parser.parse_args(argv)

    import factory  # tests/factory.py: random checkpoints and scikit-image's bundled photos

    work = args.workdir.absolute()
    checkpoint, uploads, out = work / "tiny-paligemma", work / "uploads", work / "alt_text.parquet"
    if not (checkpoint / "config.json").exists():
        print(f"building a tiny random checkpoint in {checkpoint}", flush=True)
        factory.make_checkpoint(checkpoint, "pg2", image_size=28)
    uploads.mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(factory.distinct_photos(args.images, size=96)):
        photo.save(uploads / f"photo-{i:02d}.jpg", quality=90)

    command = [sys.executable, "-m", "vlmbatch", "run", str(REPO / "pipelines" / "alt_text_nightly.toml"),
               "--set", f"source={uploads}", "--set", f"out={out}", "--set", f"model={checkpoint}",
               "--set", "device=cpu", "--set", "max_new_tokens=8"]
    for night in ("first", "second"):
        print(f"\n{night} run: {' '.join(command[1:])}", flush=True)
        if subprocess.run(command).returncode != 0:
            return 1

    import pyarrow.parquet as pq

    table = pq.read_table(out, columns=["id", "caption", "error"])
    print(f"\n{out}: {table.num_rows} rows (captions are noise: random weights)")
    for row in table.slice(0, 3).to_pylist():
        print(f"  {row['id']}: {row['caption']!r}")
    return 0 if table.num_rows == args.images else 1


if __name__ == "__main__":
    raise SystemExit(main())
