"""Device check of the GPU path: vlmbatch's engine on CUDA against transformers on the same device.

The parity tests (tests/test_parity.py) run on the CPU; this script is what a session with a GPU runs
to check the same on CUDA, where the engine takes its other road: static-shape decode steps, replayed
from a captured CUDA graph, finished rows read back every few steps, bfloat16 by default.

For each factory checkpoint (PaliGemma 1 tied and untied, PaliGemma 2; <eos> boosted so caption
lengths vary and slots free and refill), five real photos with five different prompts, three slots:

* float32 (TF32 off): the engine with and without the CUDA graph must give exactly transformers'
  greedy tokens;
* bfloat16: the engine with and without the graph must agree with each other exactly (the graph
  replays the same kernels); the share identical to transformers' bfloat16 tokens is reported, not
  required (the two implementations round differently);
* seeded sampling (which runs outside a graph) gives the same tokens twice.

    python3 eval/gpu_parity.py --json gpu_parity.json          # needs CUDA
    python3 eval/gpu_parity.py --device cpu                    # the same checks on a CPU, no graph

The GPU machine's own transformers (5.17 when last read) is the oracle here, and its PaliGemma 2
differs from the pinned 5.23 in two ways. It chose SDPA attention for Gemma 2, which drops the
attention softcap; the factory asks for eager attention, so the cap is applied. It also lacks the
final logit softcap, a monotonic tanh that leaves greedy tokens unchanged. The greedy comparisons
therefore hold under either release; the logit-level tests stay with the CPU suite.

Exit status 0 when every check passes, 1 otherwise. Not a test: CI has no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_memory import factory, machine_info

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vlmbatch.engine.scheduler import Engine, ImageWork  # noqa: E402
from vlmbatch.model.loading import load_model, resolve_checkpoint  # noqa: E402
from vlmbatch.model.processor import Processor  # noqa: E402
from vlmbatch.sources.images import resize_square  # noqa: E402
from vlmbatch.spec import GenerationSettings  # noqa: E402

VARIANTS = ["pg1_tied", "pg1_untied", "pg2"]
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera"]
PROMPTS = ["caption en", "answer en what is in the image?", "detect cat ; dog", "caption es", "ocr"]
MAX_NEW_TOKENS = 16
SLOTS = 3


def reference(hf, processor, images, device, dtype) -> list[list[int]]:
    """transformers' greedy generate on a left-padded batch; generated ids cut at <eos>."""
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=PROMPTS, images=images, return_tensors="pt", padding="longest").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        out = hf.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    eos = hf.config.text_config.eos_token_id
    rows = out[:, inputs["input_ids"].shape[1]:].tolist()
    return [row[: row.index(eos)] if eos in row else row for row in rows]


def ours(model, processor, images, settings: GenerationSettings, cuda_graph: bool) -> tuple[list[list[int]], dict]:
    size = model.cfg.vision.image_size
    work = [ImageWork(resize_square(image, size), [(i, processor.prompt_ids(p))])
            for i, (image, p) in enumerate(zip(images, PROMPTS))]
    engine = Engine(model, settings, max_slots=SLOTS, cuda_graph=cuda_graph)
    results = {c.key: c.tokens for c in engine.run(work)}
    return [results[i] for i in range(len(images))], {"graph_replays": engine.stats.graph_replays,
                                                        "decode_steps": engine.stats.decode_steps,
                                                        "cuda_graph": engine.cuda_graph}


def share(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def check_variant(variant: str, root: Path, device: torch.device) -> dict:
    began = time.perf_counter()
    hf = factory().make_checkpoint(root / variant, variant, eos_boost=2.0).eval()
    checkpoint = resolve_checkpoint(str(root / variant))
    processor = Processor.from_dir(checkpoint.path, checkpoint.config)
    ref_processor = factory().Ckpt(root / variant, hf, variant).processor()
    images = [factory().real_photos()[name].convert("RGB") for name in PHOTOS]
    graphs = [False, True] if device.type == "cuda" else [False]
    greedy = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    result: dict = {"variant": variant}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        hf.to(device=device, dtype=dtype)
        expected = reference(hf, ref_processor, images, device, dtype)
        model = load_model(checkpoint, device, dtype)
        runs = {graph: ours(model, processor, images, greedy, graph) for graph in graphs}
        eager = runs[False][0]
        entry = {"lengths": [len(tokens) for tokens in expected],
                 "identical_to_transformers": {("graph" if g else "eager"): share(tokens, expected)
                                               for g, (tokens, _) in runs.items()},
                 "graph_equals_eager": all(tokens == eager for tokens, _ in runs.values()),
                 "stats": {("graph" if g else "eager"): stats for g, (_, stats) in runs.items()}}
        checks = [entry["graph_equals_eager"]]
        if device.type == "cuda":  # the graph was captured and replayed, not quietly skipped
            checks.append(entry["stats"]["graph"]["cuda_graph"] and entry["stats"]["graph"]["graph_replays"] > 0)
        if dtype == torch.float32:
            checks += [s == 1.0 for s in entry["identical_to_transformers"].values()]
        entry["passed"] = all(checks)
        result[name] = entry
        del model
    sampling = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, temperature=0.8, top_p=0.9, seed=7)
    model = load_model(checkpoint, device)
    first, second = (ours(model, processor, images, sampling, False)[0] for _ in range(2))
    result["sampling_repeatable"] = first == second
    result["passed"] = result["float32"]["passed"] and result["bfloat16"]["passed"] and result["sampling_repeatable"]
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated factory variants")
    p.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu for the checks without a graph")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 must be float32 for exact parity
    torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory(prefix="gpu_parity_") as tmp:
        results = [check_variant(variant, Path(tmp), device) for variant in args.variants.split(",")]
    report = {"check": "gpu_parity", "device": str(device), "machine": machine_info(), "variants": results,
              "passed": all(r["passed"] for r in results)}
    for r in results:
        for dtype in ("float32", "bfloat16"):
            e = r[dtype]
            same = ", ".join(f"{k} {v:.0%}" for k, v in e["identical_to_transformers"].items())
            replays = e["stats"].get("graph", {}).get("graph_replays", "-")
            print(f"{r['variant']:10s} {dtype:8s} identical to transformers: {same}; graph == eager: "
                  f"{e['graph_equals_eager']}; graph replays {replays}; lengths {e['lengths']}: "
                  f"{'ok' if e['passed'] else 'FAILED'}")
        print(f"{r['variant']:10s} sampling repeatable: {r['sampling_repeatable']}  ({r['seconds']} s)")
    print("gpu parity:", "PASSED" if report["passed"] else "FAILED")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
