"""Memory checks: what a job would allocate against what the host or device has free, and the one-line
refusal (with what to change) before a run that cannot fit is killed by the kernel."""

from __future__ import annotations

import math

import pytest
import torch
from factory import real_photos
from typer.testing import CliRunner

from vlmbatch.cli import app
from vlmbatch.engine.scheduler import Engine, ImageWork
from vlmbatch.errors import VlmbatchError
from vlmbatch.model import memory
from vlmbatch.model.loading import (
    check_weights,
    load_model,
    resolve_checkpoint,
    weight_shapes,
)
from vlmbatch.spec import GenerationSettings

GB = memory.GB


@pytest.mark.parametrize("variant", ["pg1_untied", "pg2"])
def test_kv_cache_bytes_are_what_the_cache_allocates(make_ckpt, variant):
    model = load_model(resolve_checkpoint(str(make_ckpt(variant, "hub", image_size=28).path)))
    for dtype in (torch.float32, torch.bfloat16):
        cache = model.to(dtype).allocate_cache(5, 37)
        allocated = sum(t.nbytes for t in cache.k + cache.v)
        assert memory.kv_cache_bytes(model.cfg.text, 5, 37, dtype) == allocated


@pytest.mark.parametrize("variant", ["pg1_tied", "pg1_untied", "pg2"])
def test_the_weights_are_counted_from_the_headers_as_the_model_holds_them(make_ckpt, variant):
    """A job sizes the weights from the safetensors headers, before it builds anything: the count is
    the loaded model's, a tied head counted once."""
    checkpoint = resolve_checkpoint(str(make_ckpt(variant, "hub", image_size=28).path))
    from_headers = sum(math.prod(shape) for shape in weight_shapes(checkpoint).values())
    assert from_headers == check_weights(checkpoint) == sum(p.numel() for p in load_model(checkpoint).parameters())


def test_meminfo_is_read_in_bytes(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text("MemTotal:       24000000 kB\nMemAvailable:   2000 kB\nSwapFree:  0 kB\nHugePages_Total:  3\n")
    assert memory._read_meminfo(path) == {"MemTotal": 24_000_000 * 1024, "MemAvailable": 2000 * 1024,
                                          "SwapFree": 0, "HugePages_Total": 3}
    assert memory._read_meminfo(tmp_path / "absent") == {}


def write_cgroup(folder, files: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_cgroup_limits_count_their_inactive_file_pages_as_free(tmp_path):
    v2 = tmp_path / "v2"
    write_cgroup(v2 / "job" / "7", {"memory.max": f"{4 * GB}\n", "memory.current": f"{3 * GB}\n",
                                    "memory.stat": f"anon {2 * GB}\ninactive_file {GB // 2}\n"})
    (tmp_path / "self-v2").write_text("0::/job/7\n")
    assert memory._cgroup_available(v2, tmp_path / "self-v2") == GB + GB // 2

    write_cgroup(v2 / "job" / "7", {"memory.max": "max\n"})  # no limit
    assert memory._cgroup_available(v2, tmp_path / "self-v2") is None

    v1 = tmp_path / "v1"  # a namespaced v1 cgroup: the process's path is not below the mount, its root is
    write_cgroup(v1 / "memory", {"memory.limit_in_bytes": f"{2 * GB}\n", "memory.usage_in_bytes": f"{GB}\n",
                                 "memory.stat": "total_inactive_file 1024\n"})
    (tmp_path / "self-v1").write_text("5:cpu,cpuacct:/x\n4:memory:/docker/abc\n")
    assert memory._cgroup_available(v1, tmp_path / "self-v1") == GB + 1024

    write_cgroup(v1 / "memory", {"memory.limit_in_bytes": "9223372036854771712\n"})  # v1's "no limit"
    assert memory._cgroup_available(v1, tmp_path / "self-v1") is None
    assert memory._cgroup_available(v1, tmp_path / "no-such-file") is None


def test_available_host_memory_is_the_lower_of_the_host_and_the_cgroup(monkeypatch):
    monkeypatch.setattr(memory, "_read_meminfo", lambda: {"MemAvailable": 10 * GB, "SwapFree": 2 * GB})
    monkeypatch.setattr(memory, "_cgroup_available", lambda: None)
    assert memory.available_bytes(torch.device("cpu")) == 12 * GB
    monkeypatch.setattr(memory, "_cgroup_available", lambda: 3 * GB)
    assert memory.available_bytes(torch.device("cpu")) == 3 * GB
    monkeypatch.setattr(memory, "_read_meminfo", lambda: {})
    assert memory.available_bytes(torch.device("cpu")) is None
    assert memory.available_bytes(torch.device("meta")) is None


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name, image in list(real_photos().items())[:2]:
        image.convert("RGB").save(root / f"{name}.jpg")
    return root


@pytest.mark.parametrize("slots, available, remedy", [
    (100_000, None, "lower --batch-size to at most {fit}"),  # the cache is what does not fit
    (1, "half the weights", "--dtype bfloat16 halves the weights"),  # the weights alone do not fit
])
def test_a_job_that_cannot_fit_stops_before_any_work(folder, tmp_path, make_ckpt, monkeypatch, slots,
                                                     available, remedy):
    import vlmbatch.pipeline

    ckpt = make_ckpt("pg1_untied", "hub", image_size=28)
    config = resolve_checkpoint(str(ckpt.path)).config
    weights = 4 * sum(p.numel() for p in load_model(resolve_checkpoint(str(ckpt.path))).parameters())
    max_len = config.num_image_tokens + 1 + 256 + 8
    per_slot = memory.kv_cache_bytes(config.text, 1, max_len, torch.float32)
    runtime = memory.PROCESS_OVERHEAD
    free = weights // 2 if available == "half the weights" else weights + runtime + 1000 * per_slot + per_slot // 2
    monkeypatch.setattr(vlmbatch.pipeline, "available_bytes", lambda device: free)
    out = tmp_path / "o.parquet"
    result = CliRunner().invoke(app, ["caption", str(folder), "--out", str(out), "--model", str(ckpt.path),
                                      "--max-new-tokens", "8", "--batch-size", str(slots), "--quiet"])
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert line.startswith("error: not enough memory on cpu: weights (float32) ")
    assert f"KV cache ({slots} slots x {max_len} tokens)" in line and "+ runtime 0.5 GB =" in line
    assert remedy.format(fit=1000) in line
    assert not out.exists()


def test_the_engine_refuses_a_cache_the_device_cannot_hold(make_ckpt, monkeypatch):
    """On CUDA the job leaves the check to the engine, which makes it once the weights are in."""
    model = load_model(resolve_checkpoint(str(make_ckpt("pg1_untied", "hub", image_size=28).path)))
    engine = Engine(model, GenerationSettings(max_new_tokens=4), max_slots=64, max_prompt_len=20)
    monkeypatch.setattr(memory, "available_bytes", lambda device: memory.kv_cache_bytes(
        model.cfg.text, 63, 24, model.dtype))
    work = [ImageWork(torch.zeros(28, 28, 3, dtype=torch.uint8).numpy(), [("a", [2, 3])])]
    with pytest.raises(VlmbatchError, match=r"^not enough memory on cpu: KV cache \(64 slots x 24 tokens\) .*"
                                            r"lower --batch-size$"):
        list(engine.run(work))


def test_onednn_keeps_a_packed_copy_of_a_tied_head_and_the_estimate_counts_it(folder, tmp_path, make_ckpt,
                                                                             monkeypatch):
    import vlmbatch.pipeline

    ckpt = make_ckpt("pg1_tied", "hub", image_size=28)
    config = resolve_checkpoint(str(ckpt.path)).config
    weights = 4 * sum(p.numel() for p in load_model(resolve_checkpoint(str(ckpt.path))).parameters())
    cache = memory.kv_cache_bytes(config.text, 2, config.num_image_tokens + 1 + 256 + 4, torch.float32)
    head = 4 * config.text.vocab_size * config.text.hidden_size
    free = weights + cache + memory.PROCESS_OVERHEAD + head // 2
    monkeypatch.setattr(vlmbatch.pipeline, "available_bytes", lambda device: free)
    args = ["caption", str(folder), "--model", str(ckpt.path), "--max-new-tokens", "4", "--batch-size", "2",
            "--quiet", "--cpu-matmul"]
    fits = CliRunner().invoke(app, [*args, "torch", "--out", str(tmp_path / "a.parquet")])
    assert fits.exit_code == 0, fits.output
    refused = CliRunner().invoke(app, [*args, "onednn", "--out", str(tmp_path / "b.parquet")])
    assert refused.exit_code == 2 and "not enough memory on cpu" in refused.output
