"""Smoke test of the benchmark scripts in eval/: each runs end to end on a tiny workload and writes
JSON with the expected keys and sane values. Nothing is timed against a threshold here: benchmarks
measure, tests check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # spawns the benchmark, which spawns vlmbatch and transformers


def run_benchmark(name: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(REPO / "eval" / f"{name}.py"), *args, "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "goal:" in proc.stdout
    return json.loads(out.read_text())


def check_machine(machine: dict) -> None:
    assert machine["cores"] >= 1 and machine["cpu"] and machine["torch"] and machine["device"]


def test_throughput_benchmark_runs_both_sides(tmp_path):
    r = run_benchmark("bench_throughput", tmp_path, "--tiny", "--images", "4", "--max-new-tokens", "4", "--graph-ab")
    check_machine(r["machine"])
    assert r["workload"]["images"] == 4 and r["workload"]["parameters"]["total"] > 0
    for side in ("vlmbatch", "transformers"):
        figures = r[side]
        assert figures["images_per_second"] > 0 and figures["seconds"] > 0
        assert figures["loop_images_per_second"] is None or figures["loop_images_per_second"] > 0
        assert figures["peak_rss_mb"] > 50 and figures["peak_tree_rss_mb"] > 50  # a Python with torch
    # The ratio is the two sides' own throughputs divided, not a figure made up elsewhere.
    assert r["speedup_whole_process"] == pytest.approx(
        r["vlmbatch"]["images_per_second"] / r["transformers"]["images_per_second"], rel=1e-6)
    ours = r["vlmbatch"]  # a resume with nothing to do loads no model: the fixed cost adds the timed load
    assert ours["nothing_to_do_seconds"] > 0 and ours["model_load_seconds"] > 0
    assert ours["fixed_seconds"] == pytest.approx(ours["nothing_to_do_seconds"] + ours["model_load_seconds"], abs=0.02)
    assert len(r["paired_speedups"]) == 1 and r["paired_speedup_median"] == pytest.approx(
        r["transformers"]["seconds"] / r["vlmbatch"]["seconds"], rel=0.01)  # one repeat: the pair is the best of each
    assert r["compared"] == 4 and r["errors"] == 0
    # Same weights, greedy, float32 on one CPU: the engine is token-identical to transformers.
    assert r["identical"] == 4 and r["identical_share"] == 1.0
    lengths = r["lengths"]
    assert 0 <= lengths["min"] <= lengths["median"] <= lengths["max"] <= 4
    assert sum(lengths["histogram"].values()) == 4
    assert set(r["goals"]) == {"speedup_whole_process", "identical_share"}
    assert r["graph_ab"]["cuda_graph"] is False and r["graph_ab"]["seconds"] > 0  # the flipped setting, timed


def test_memory_benchmark_samples_rss_against_progress(tmp_path):
    r = run_benchmark("bench_memory", tmp_path, "--images", "600", "--flush-rows", "50", "--interval", "0.05")
    check_machine(r["machine"])
    assert r["workload"]["rows_written"] == 600
    assert r["images_per_second"] > 0 and r["peak_tree_rss_mb"] > 50
    assert set(r["rss_at_progress"]) == {"10%", "50%", "90%"}
    seen = [mark for mark in r["rss_at_progress"].values() if mark is not None]
    assert seen and all(mark["tree_rss_mb"] >= mark["main_rss_mb"] > 0 for mark in seen)
    slope = r["slope_tree_mb_per_10k_images"]  # enough samples between 10 % and 95 % to fit a line
    assert isinstance(slope, float) and r["steady_samples"] >= 3 and r["flat"] == (abs(slope) <= 5)
    assert r["samples"] and all(len(s) == 4 for s in r["samples"])


def test_throughput_runner_never_resumes_an_earlier_invocations_output(tmp_path, monkeypatch):
    # With a kept --workdir, run N of a second invocation has the same output name as run N of the
    # first; vlmbatch would resume that finished file and be timed doing nothing.
    monkeypatch.syspath_prepend(str(REPO / "eval"))
    import bench_throughput

    runner = bench_throughput.Runner(bench_throughput.TINY, tmp_path, tmp_path / "images", tmp_path / "ckpt",
                                     max_new_tokens=4, hf_batch_size=2, workers=None, interval=0.1)
    stale = tmp_path / "01-vlmbatch-b4.parquet"
    parts = stale.with_name(stale.name + ".parts")
    parts.mkdir()
    (parts / "part-000000.parquet").write_bytes(b"rows")
    for path in (stale, stale.with_name(stale.name + ".lock")):
        path.write_bytes(b"rows")
    assert runner._next("vlmbatch-b4.parquet") == stale
    assert sorted(tmp_path.iterdir()) == []


def test_gpu_goals_add_the_images_per_second_floor(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "eval"))
    import bench_throughput

    result = {"speedup_whole_process": 3.4, "identical_share": 0.95, "vlmbatch": {"images_per_second": 120.0}}
    gpu = bench_throughput.goals(result, bench_throughput.GPU)
    assert gpu["speedup_whole_process"] == {"goal": 3.0, "measured": 3.4, "met": True}
    assert gpu["images_per_second"] == {"goal": 150.0, "measured": 120.0, "met": False}
    cpu = bench_throughput.goals(result, bench_throughput.CPU)
    assert set(cpu) == {"speedup_whole_process", "identical_share"} and cpu["speedup_whole_process"]["goal"] == 2.0


def test_gpu_parity_check_runs_its_checks_on_a_cpu(tmp_path):
    """eval/gpu_parity.py is run by sessions with a GPU; on a CPU it makes the same comparisons
    without the graph, so its own logic is checked here."""
    out = tmp_path / "gpu_parity.json"
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "gpu_parity.py"), "--device", "cpu",
                           "--variants", "pg1_untied", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["passed"] and r["device"] == "cpu" and [v["variant"] for v in r["variants"]] == ["pg1_untied"]
    variant = r["variants"][0]
    assert variant["float32"]["identical_to_transformers"] == {"eager": 1.0}
    assert len(set(variant["float32"]["lengths"])) > 1  # slots free at different steps
    assert variant["sampling_repeatable"] and "gpu parity: PASSED" in proc.stdout


def test_gpu_workload_checkpoint_pads_the_vocabulary_with_ids_never_generated(tmp_path, monkeypatch, photos):
    """The --gpu workload's checkpoint (built only on a GPU session, so checked here at a tiny size on
    a CPU): bfloat16, its tied embedding padded to the real vocabulary with zero rows, which greedy
    decoding never picks, so every caption decodes to text."""
    monkeypatch.syspath_prepend(str(REPO / "eval"))
    import dataclasses

    import bench_throughput
    import torch
    from safetensors.torch import load_file

    from vlmbatch.engine.scheduler import Engine, ImageWork
    from vlmbatch.model.loading import load_model, resolve_checkpoint
    from vlmbatch.model.processor import Processor
    from vlmbatch.sources.images import load_resized
    from vlmbatch.spec import GenerationSettings

    padded = 4096
    workload = dataclasses.replace(bench_throughput.GPU, model={}, image_size=28, device="cpu", vocab_size=padded)
    counts = bench_throughput.build_checkpoint(workload, tmp_path, seed=0, eos_boost=bench_throughput.DEFAULT_EOS_BOOST)
    assert counts["total"] == counts["vision"] + counts["projector"] + counts["text"] + counts["lm_head"] > 0

    checkpoint = resolve_checkpoint(str(tmp_path))
    known = bench_throughput.factory().tokenizer_ids(tmp_path)["vocab_size"]
    assert checkpoint.config.text.vocab_size == padded > known and checkpoint.config.tie_word_embeddings
    tensors = {k: v for path in sorted(tmp_path.glob("*.safetensors")) for k, v in load_file(path).items()}
    embedding = next(v for k, v in tensors.items() if k.endswith("embed_tokens.weight"))
    assert embedding.dtype == torch.bfloat16 and embedding.shape[0] == padded
    assert not embedding[known:].any() and embedding[:known].any()

    model = load_model(checkpoint, "cpu", torch.bfloat16)
    processor = Processor.from_dir(checkpoint.path, checkpoint.config)
    work = [ImageWork(load_resized(img, 28), [(name, processor.prompt_ids("caption en"))])
            for name, img in photos.items()]
    completions = list(Engine(model, GenerationSettings(max_new_tokens=8), max_slots=4).run(work))
    assert len(completions) == len(photos) and any(c.tokens for c in completions)
    assert all(0 <= t < known for c in completions for t in c.tokens)


def test_the_smoke_script_runs_the_shipped_nightly_spec_and_resumes(tmp_path):
    """README's path without Hub access: a tiny checkpoint, sample photos, pipelines/alt_text_nightly.toml twice."""
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "smoke.py"), "--workdir", str(tmp_path), "--images", "3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{tmp_path / 'alt_text.parquet'}: 3 rows" in proc.stdout
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "alt_text.parquet")
    assert sorted(table.column("id").to_pylist()) == ["photo-00.jpg", "photo-01.jpg", "photo-02.jpg"]
    assert table.column("error").null_count == 3
    assert "already done (skipped) │ 3" in proc.stderr  # the second night found nothing new
