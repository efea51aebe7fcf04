"""The plain transformers script a user would otherwise write to caption a folder with PaliGemma.

`PaliGemmaProcessor` + `PaliGemmaForConditionalGeneration.from_pretrained(...).generate(...)` in
static batches (default 8) with left padding over the sorted file list, greedy, decoded with
`skip_special_tokens=True`, written to Parquet as (id, caption). Ids are paths relative to FOLDER
with '/' separators, as `vlmbatch caption FOLDER` writes them, so the two outputs can be joined.

It is the baseline of eval/bench_throughput.py, which times this whole process from outside. With
`--stats PATH` it also records what it measures itself, as JSON:
    images, load_seconds (imports + processor + model load), loop_seconds (the batch loop: reading
    images, processor, generate, decoding; not the Parquet write) and loop_images_per_second,
    generate_seconds (inside generate only), device, dtype, cuda_max_memory_allocated (bytes, CUDA only).

    python3 eval/hf_baseline.py FOLDER --model CKPT --out captions.parquet --batch-size 8 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Caption a folder with transformers' PaliGemma (benchmark baseline).")
    p.add_argument("folder", type=Path)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--out", type=Path, required=True, help="output Parquet file (id, caption)")
    p.add_argument("--prompt", default="caption en")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--stats", type=Path, default=None, help="write the timings measured inside to this JSON file")
    return p.parse_args()


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    # Imported here so that load_seconds counts them, as a user's script pays for them.
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    processor = PaliGemmaProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "left"
    model = PaliGemmaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device).eval()
    files = list_images(args.folder)
    loaded = time.perf_counter()

    ids, captions, generate_seconds = [], [], 0.0
    for start in range(0, len(files), args.batch_size):
        batch = files[start:start + args.batch_size]
        images = [Image.open(path).convert("RGB") for path in batch]
        inputs = processor(text=[args.prompt] * len(batch), images=images, return_tensors="pt", padding="longest")
        inputs = inputs.to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        began = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        generate_seconds += time.perf_counter() - began
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        captions += processor.batch_decode(new_tokens, skip_special_tokens=True)
        ids += [path.relative_to(args.folder).as_posix() for path in batch]
    if device.type == "cuda":
        torch.cuda.synchronize()
    loop_seconds = time.perf_counter() - loaded

    pq.write_table(pa.table({"id": ids, "caption": captions}), args.out)
    stats = {"images": len(ids), "load_seconds": loaded - started, "loop_seconds": loop_seconds,
             "loop_images_per_second": len(ids) / loop_seconds if loop_seconds else 0.0,
             "generate_seconds": generate_seconds, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
             "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    if device.type == "cuda":
        stats["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
    print(json.dumps(stats))
    if args.stats:
        args.stats.write_text(json.dumps(stats, indent=2) + "\n")


if __name__ == "__main__":
    main()
