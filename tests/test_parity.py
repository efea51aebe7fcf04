"""The engine against transformers' PaliGemma on random checkpoints: inputs, logits, generated tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factory import photo_variants
from PIL import Image, ImageOps

from vlmbatch.engine import scheduler as engine_module
from vlmbatch.engine.scheduler import Engine, EngineStats, ImageWork
from vlmbatch.model import blocks
from vlmbatch.model.gemma import KVCache
from vlmbatch.model.loading import load_model, resolve_checkpoint
from vlmbatch.model.paligemma import NextTokens, Prompts
from vlmbatch.model.processor import Processor
from vlmbatch.sources.images import load_image, resize_square
from vlmbatch.spec import GenerationSettings

VARIANTS = ["pg1_tied", "pg1_untied", "pg2"]
PROMPTS = ["caption en", "answer en what is in the image?", "detect cat ; dog", "caption es", "ocr"]


def ours(ckpt, cpu_matmul="torch"):
    checkpoint = resolve_checkpoint(str(ckpt.path))
    return load_model(checkpoint, cpu_matmul=cpu_matmul), Processor.from_dir(checkpoint.path, checkpoint.config)


@pytest.fixture(params=["torch", "onednn"])
def cpu_matmul(request):
    """Who multiplies the linear layers (`blocks.choose_cpu_matmul`): which one a run takes depends on
    the processor, so the tests that compare against the reference run through both, on any machine."""
    assert request.param == "torch" or blocks.onednn_available(), "the pinned torch CPU build has oneDNN"
    return request.param


def reference_generate(ckpt, images, prompts, **kwargs) -> list[list[int]]:
    """transformers' generate on a left-padded batch; generated ids cut at <eos>."""
    processor = ckpt.processor()
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding="longest")
    with torch.no_grad():
        out = ckpt.hf.generate(**inputs, do_sample=False, **kwargs)[:, inputs["input_ids"].shape[1]:]
    eos = ckpt.ids["eos"]
    return [row[: row.index(eos)] if eos in row else row for row in out.tolist()]


def engine_run(model, processor, images, prompts, settings, slots=8, **engine_kw) -> tuple[list[list[int]], EngineStats]:
    size = model.cfg.vision.image_size
    work = [ImageWork(resize_square(image, size), [(i, processor.prompt_ids(p))])
            for i, (image, p) in enumerate(zip(images, prompts))]
    engine = Engine(model, settings, max_slots=slots, **engine_kw)
    results = {c.key: c.tokens for c in engine.run(work)}
    return [results[i] for i in range(len(images))], engine.stats


def engine_generate(model, processor, images, prompts, settings, slots=8, **engine_kw) -> list[list[int]]:
    return engine_run(model, processor, images, prompts, settings, slots, **engine_kw)[0]


@pytest.fixture(scope="module")
def images(photos):
    names = ["astronaut", "chelsea", "coffee", "rocket", "camera"]
    return [photos[n].convert("RGB") for n in names]


# -- inputs ---------------------------------------------------------------------------------------
def test_pixels_and_ids_match_reference_processor(ckpt_pg1_untied, tmp_path):
    processor = ckpt_pg1_untied.processor()
    _, mine = ours(ckpt_pg1_untied)
    files = photo_variants(tmp_path)
    checked = 0
    for name, path in files.items():
        if name == "i16_png":
            continue  # 16-bit is scaled here where the reference clips it to white: next test
        with Image.open(path) as f:
            reference_image = ImageOps.exif_transpose(f)
        for prompt in ["caption en", "answer en where is the <loc0012> cat?"]:
            ref = processor(text=[prompt], images=[reference_image], return_tensors="pt")
            got_pixels = mine.pixel_values([load_image(path)])
            np.testing.assert_allclose(got_pixels.numpy(), ref["pixel_values"].numpy(), atol=1e-5, rtol=0,
                                       err_msg=name)
            assert mine.prompt_ids(prompt) == ref["input_ids"][0].tolist(), (name, prompt)
        checked += 1
    assert checked >= 8


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """Pillow (and so the reference) clips 16-bit values to 255, turning most photos white."""
    path = photo_variants(tmp_path)["i16_png"]
    with Image.open(path) as raw:
        expected = (np.asarray(raw, dtype=np.float64) / 257).round()
    got = np.asarray(load_image(path), dtype=np.float64)[..., 0]
    assert np.abs(got - expected).max() <= 1
    assert got.std() > 10  # a photo, not a white page


def test_decode_keeps_location_tokens(ckpt_pg1_untied):
    _, processor = ours(ckpt_pg1_untied)
    ids = processor.tokenizer.encode("<loc0001><loc1023><seg042> cat", add_special_tokens=False).ids
    eos, bos = ckpt_pg1_untied.ids["eos"], ckpt_pg1_untied.ids["bos"]
    text = processor.decode([bos] + ids + [eos])
    assert text == "<loc0001><loc1023><seg042> cat"
    reference = ckpt_pg1_untied.processor().decode([bos] + ids + [eos], skip_special_tokens=True)
    assert text == reference


# -- logits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, overrides", [pytest.param(v, {}, id=v) for v in VARIANTS] + [
    # Grouped-query attention, as in PaliGemma 2's decoders (the factory's have one key/value head).
    pytest.param(v, {"num_key_value_heads": 2}, id=f"{v}-kv2") for v in ("pg1_untied", "pg2")
])
def test_logits_match_reference_through_prefill_and_decode(make_ckpt, images, variant, overrides, cpu_matmul):
    """Prompt logits, then teacher-forced decode steps through the KV cache, against one full
    forward of the reference with the suffix marked causal (token_type_ids 1)."""
    ckpt = make_ckpt(variant, **overrides)
    model, processor = ours(ckpt, cpu_matmul)
    prompts = ["caption en", "caption es"]  # equal lengths: the reference forward needs no padding
    inputs = ckpt.processor()(text=prompts, images=images[:2], return_tensors="pt")
    suffix = torch.tensor([[5, 17, 300, 42], [99, 7, 64, 1000]])
    ids = torch.cat([inputs["input_ids"], suffix], dim=1)
    token_type = torch.cat([torch.zeros_like(inputs["input_ids"]), torch.ones_like(suffix)], dim=1)
    with torch.no_grad():
        ref = ckpt.hf(input_ids=ids, pixel_values=inputs["pixel_values"], token_type_ids=token_type,
                      attention_mask=torch.ones_like(ids)).logits
    prompt_len = inputs["input_ids"].shape[1]

    features = model.encode_images(inputs["pixel_values"])
    cache = model.allocate_cache(2, prompt_len + suffix.shape[1])
    lengths = torch.full((2,), prompt_len)
    got = [model.prefill(inputs["input_ids"], lengths, features, cache, torch.arange(2))]
    for t in range(suffix.shape[1] - 1):
        got.append(model.decode(suffix[:, t], lengths + t, cache))
    got = torch.stack(got, dim=1)
    torch.testing.assert_close(got, ref[:, prompt_len - 1: -1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["pg1_untied", "pg2"])
def test_mixed_step_equals_a_prefill_and_a_decode_step(make_ckpt, images, variant, cpu_matmul):
    """A step that prefills a prompt into row 0 while row 1 decodes its next token gives both the
    logits and the cache contents of the two done separately. Row 0 is in the decode batch without
    a live sequence: its write goes to the spare column, not over the prompt it receives."""
    model, processor = ours(make_ckpt(variant), cpu_matmul)
    features = model.encode_images(processor.pixel_values(images[:3]))
    first = processor.collate([processor.prompt_ids(p) for p in ("caption en", "caption es")])
    cache = model.allocate_cache(2, 300)
    model.prefill(first.ids, first.lengths, features[:2], cache, torch.arange(2))
    tokens, cols = torch.tensor([5, 17]), first.lengths.clone()
    for _ in range(3):  # row 0's sequence runs a few steps, so its next column lies inside the new prompt
        tokens = model.decode(tokens, cols, cache).argmax(-1)
        cols += 1
    new = processor.collate([processor.prompt_ids("answer en what is in the image?")])
    assert new.lengths[0] > cols[0], "the dead row's stale column must fall inside the new prompt"
    prompts = Prompts(new.ids, new.lengths, features[2:], torch.tensor([0]))
    decode = NextTokens(tokens, torch.tensor([cache.spare_col, int(cols[1])]), width=int(cols[1]) + 1)

    separate = KVCache([k.clone() for k in cache.k], [v.clone() for v in cache.v])
    want_prefill = model.prefill(prompts.ids, prompts.lengths, prompts.image_features, separate, prompts.rows)
    want_decode = model.decode(decode.tokens, decode.cols, separate, decode.width)
    got_prefill, got_decode = model.step(cache, prompts, decode)

    torch.testing.assert_close(got_prefill, want_prefill, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_decode[1], want_decode[1], atol=1e-4, rtol=0)
    for got, want in zip(cache.k + cache.v, separate.k + separate.v):
        torch.testing.assert_close(got[:, :, : cache.max_len], want[:, :, : cache.max_len], atol=1e-5, rtol=0)


def test_mlp_row_blocks_leave_outputs_unchanged(ckpt_pg1_untied, images, monkeypatch, cpu_matmul):
    """On a CPU the MLPs run over slices of rows (`model.blocks`); vision features and prompt logits
    are the same bits as in one piece."""
    model, processor = ours(ckpt_pg1_untied, cpu_matmul)
    pixels = processor.pixel_values(images)
    batch = processor.collate([processor.prompt_ids(p) for p in PROMPTS])

    def run():
        features = model.encode_images(pixels)
        cache = model.allocate_cache(len(PROMPTS), batch.ids.shape[1])
        return features, model.prefill(batch.ids, batch.lengths, features, cache, torch.arange(len(PROMPTS)))

    monkeypatch.setattr(blocks, "CPU_ROW_BLOCK", 10**9)
    whole = run()
    monkeypatch.setattr(blocks, "CPU_ROW_BLOCK", 100)  # 5 images x 256 patches: 13 slices, the last short
    sliced = run()
    assert torch.equal(whole[0], sliced[0])
    assert torch.equal(whole[1], sliced[1])


# -- generation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_identical_to_reference_for_mixed_prompt_lengths(make_ckpt, images, variant, cpu_matmul):
    ckpt = make_ckpt(variant)
    model, processor = ours(ckpt, cpu_matmul)
    settings = GenerationSettings(max_new_tokens=12)
    expected = reference_generate(ckpt, images, PROMPTS, max_new_tokens=12)
    assert len({tuple(e) for e in expected}) > 1, "the random model should not give one output for all"
    assert engine_generate(model, processor, images, PROMPTS, settings) == expected
    # Each item alone gives what it gave in the batch.
    for image, prompt, want in zip(images, PROMPTS, expected):
        assert engine_generate(model, processor, [image], [prompt], settings, slots=1) == [want]


def test_continuous_batching_with_fewer_slots_than_requests(ckpt_pg1_untied, images, cpu_matmul):
    """Two slots for five requests: queued requests enter as slots free up, outputs unchanged."""
    model, processor = ours(ckpt_pg1_untied, cpu_matmul)
    expected = reference_generate(ckpt_pg1_untied, images, PROMPTS, max_new_tokens=10)
    settings = GenerationSettings(max_new_tokens=10)
    assert engine_generate(model, processor, images, PROMPTS, settings, slots=2) == expected


@pytest.mark.parametrize("sync_every, mixed_steps", [(1, False), (3, False), (3, True)])
def test_static_shape_decode_as_used_on_gpus(make_ckpt, images, sync_every, mixed_steps):
    """All slots and the full cache width every step, finished rows noticed only every few steps:
    the GPU path's shapes and sync pattern, run here on the CPU (by default without mixed steps)."""
    ckpt = make_ckpt("pg2", eos_boost=4.0)
    model, processor = ours(ckpt)
    expected = reference_generate(ckpt, images, PROMPTS, max_new_tokens=12)
    got, stats = engine_run(model, processor, images, PROMPTS, GenerationSettings(max_new_tokens=12), slots=3,
                            static_shapes=True, sync_every=sync_every, mixed_steps=mixed_steps)
    assert got == expected
    assert (stats.mixed_steps > 0) == mixed_steps


def graph_stand_in(fn, device):
    """What `capture_cuda_graph` does, on a CPU: the warm-up run, then a replay that is a trace of `fn`
    taken once. Dynamo with fullgraph refuses what a CUDA graph cannot hold (a host sync such as
    .item() or .tolist(), a shape read off the data); error_on_recompile refuses a replay whose Python
    values (shapes, ints) differ from those traced, which a graph would silently replay stale."""
    fn()
    return torch.compile(fn, backend="eager", fullgraph=True, dynamic=False)


@pytest.mark.parametrize("variant", ["pg1_untied", "pg2"])
def test_cuda_graph_decode_replays_one_captured_step(make_ckpt, images, variant, monkeypatch):
    """The CUDA path's decode: one fixed-shape step captured before the first prefill and replayed
    for every decode-only step of the run, as slots fill, finish and refill; tokens unchanged."""
    ckpt = make_ckpt(variant, eos_boost=4.0)
    model, processor = ours(ckpt)
    expected = reference_generate(ckpt, images, PROMPTS, max_new_tokens=12)
    assert len({len(e) for e in expected}) > 1
    captured = []
    monkeypatch.setattr(engine_module, "graphs_apply", lambda device, settings: True)  # as on CUDA
    monkeypatch.setattr(engine_module, "capture_cuda_graph", lambda fn, device: captured.append(device) or
                        graph_stand_in(fn, device))
    torch._dynamo.reset()  # each run's step is a new closure of the same code: forget earlier traces
    with torch._dynamo.config.patch(error_on_recompile=True):
        got, stats = engine_run(model, processor, images, PROMPTS, GenerationSettings(max_new_tokens=12), slots=3,
                                cuda_graph=True)
    assert got == expected
    assert captured == [model.device]
    assert stats.mixed_steps == 0 and stats.graph_replays == stats.decode_steps > 0


def test_cuda_graph_capture_failure_falls_back_to_the_same_step_eagerly(make_ckpt, images, monkeypatch):
    ckpt = make_ckpt("pg1_untied", eos_boost=4.0)
    model, processor = ours(ckpt)
    expected = reference_generate(ckpt, images, PROMPTS, max_new_tokens=8)

    def failing(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(engine_module, "graphs_apply", lambda device, settings: True)  # as on CUDA
    monkeypatch.setattr(engine_module, "capture_cuda_graph", failing)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the decode step failed"):
        got, stats = engine_run(model, processor, images, PROMPTS, GenerationSettings(max_new_tokens=8), slots=3,
                                cuda_graph=True)
    assert got == expected
    assert stats.graph_replays == 0 and stats.decode_steps > 0


def test_cuda_graphs_by_default_on_cuda_for_greedy_decoding_only(ckpt_pg1_untied, monkeypatch):
    model, _ = ours(ckpt_pg1_untied)
    assert not Engine(model, GenerationSettings()).cuda_graph  # a CPU model
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda", 0)))
    greedy = Engine(model, GenerationSettings())
    assert greedy.cuda_graph and greedy.static_shapes and not greedy.mixed_steps and greedy.sync_every > 1
    assert not Engine(model, GenerationSettings(num_beams=2)).cuda_graph
    assert not Engine(model, GenerationSettings(), cuda_graph=False).cuda_graph


@pytest.mark.parametrize("mixed_steps", [True, False])
def test_varied_output_lengths_free_slots_early(make_ckpt, images, mixed_steps, cpu_matmul):
    """With a boosted <eos> row, outputs end at different steps; still identical to the reference,
    with the running sequence's next token taken inside each later prefill or in a step of its own."""
    ckpt = make_ckpt("pg1_untied", eos_boost=4.0)
    model, processor = ours(ckpt, cpu_matmul)
    expected = reference_generate(ckpt, images, PROMPTS, max_new_tokens=16)
    assert len({len(e) for e in expected}) > 1
    got, stats = engine_run(model, processor, images, PROMPTS, GenerationSettings(max_new_tokens=16), slots=2,
                            mixed_steps=mixed_steps)
    assert got == expected
    assert (stats.mixed_steps > 0) == mixed_steps


def test_prefills_stay_batched_once_the_input_is_exhausted(make_ckpt, images, monkeypatch):
    """Ten requests fit the waiting window at once, so the input is exhausted before the first step.
    The engine still waits for `admit_at` free slots (or for every waiting request, if fewer wait)
    before it prefills, rather than prefilling each request alone as its slot frees; tokens unchanged."""
    ckpt = make_ckpt("pg1_untied", eos_boost=4.0)
    model, processor = ours(ckpt)
    prompts = PROMPTS + PROMPTS[::-1]
    pictures = images + images
    expected = reference_generate(ckpt, pictures, prompts, max_new_tokens=16)
    assert len({len(e) for e in expected}) > 2  # slots free at different steps
    groups = []
    step = model.step
    monkeypatch.setattr(model, "step", lambda cache, prompts=None, decode=None: (
        groups.append(len(prompts.rows)) if prompts is not None else None) or step(cache, prompts, decode))
    got, stats = engine_run(model, processor, pictures, prompts, GenerationSettings(max_new_tokens=16), slots=4,
                            admit_at=2)
    assert got == expected
    assert groups[0] == 4 and sum(groups) == 10
    assert all(size >= min(2, 10 - sum(groups[:i])) for i, size in enumerate(groups)), groups


def test_a_reused_slot_keeps_the_prompt_it_receives(make_ckpt, images, monkeypatch):
    """Slot 0's caption ends after one token while slot 1 keeps decoding; a longer prompt then takes
    slot 0 in a mixed step, whose decode part still covers rows 0..1. Row 0's stale column lies inside
    the new prompt, so the step must send row 0's decode write to the spare column: after the run,
    row 0 holds the keys and values of that prompt exactly as a prefill of it alone writes them."""
    ckpt = make_ckpt("pg1_untied", eos_boost=4.0)
    model, processor = ours(ckpt)
    caches = []
    allocate = model.allocate_cache
    monkeypatch.setattr(model, "allocate_cache", lambda *a: caches.append(allocate(*a)) or caches[-1])
    prompts = ["ocr", "caption en", PROMPTS[1]]  # 259, 260 and 268 tokens
    got, stats = engine_run(model, processor, [images[4], images[1], images[3]], prompts,
                            GenerationSettings(max_new_tokens=16), slots=2)
    assert len(got[0]) == 1 and len(got[1]) == 16 and stats.mixed_steps == 1  # the scenario above

    ids = processor.prompt_ids(prompts[2])
    alone = allocate(1, len(ids))
    features = model.encode_images(processor.pixel_values([images[3]]))
    model.prefill(torch.tensor([ids]), torch.tensor([len(ids)]), features, alone, torch.tensor([0]))
    for engine_kv, alone_kv in zip(caches[0].k + caches[0].v, alone.k + alone.v):
        torch.testing.assert_close(engine_kv[0, :, : len(ids)], alone_kv[0, :, : len(ids)], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["pg1_untied", "pg2"])
def test_beam_search_identical_to_reference(make_ckpt, images, variant, cpu_matmul):
    ckpt = make_ckpt(variant, eos_boost=3.0)
    model, processor = ours(ckpt, cpu_matmul)
    expected = reference_generate(ckpt, images[:4], PROMPTS[:4], max_new_tokens=10, num_beams=2)
    settings = GenerationSettings(max_new_tokens=10, num_beams=2)
    assert engine_generate(model, processor, images[:4], PROMPTS[:4], settings) == expected
    assert engine_generate(model, processor, images[:1], PROMPTS[:1], settings, slots=2) == expected[:1]


def test_sliding_window_layers_match_reference(make_ckpt, images, cpu_matmul):
    """Gemma 2 with a window much shorter than the prompt: prefix stays bidirectional, decode slides."""
    ckpt = make_ckpt("pg2", image_size=56, sliding_window=6)
    model, processor = ours(ckpt, cpu_matmul)
    for image, prompt in zip(images[:3], PROMPTS[:3]):  # one at a time: no padding, positions = indices
        expected = reference_generate(ckpt, [image], [prompt], max_new_tokens=12)
        assert engine_generate(model, processor, [image], [prompt], GenerationSettings(max_new_tokens=12)) == [expected[0]]


def test_sampling_is_reproducible_with_a_seed_whatever_the_batching(ckpt_pg1_untied, images):
    """A request's draws depend on the seed, its key and its step only: not on its slot, its batch
    mates or whether its prefill rode with other rows' decode steps."""
    model, processor = ours(ckpt_pg1_untied)
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    first = engine_generate(model, processor, images, PROMPTS, settings)
    assert engine_generate(model, processor, images, PROMPTS, settings) == first
    for slots in (1, 2, 3):
        assert engine_generate(model, processor, images, PROMPTS, settings, slots=slots) == first, slots
    assert engine_generate(model, processor, images[2:], PROMPTS[2:], settings) != first[2:]  # keys are indices
    other_seed = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=124)
    assert engine_generate(model, processor, images, PROMPTS, other_seed) != first
    greedy = engine_generate(model, processor, images, PROMPTS, GenerationSettings(max_new_tokens=8))
    assert first != greedy


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_sampled_tokens_follow_the_tempered_nucleus_distribution(temperature, top_p):
    """Many requests (streams) drawing from the same logits: the frequencies are softmax(logits / T)
    renormalised over the top-p set (transformers' TopPLogitsWarper keeps the same set)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from vlmbatch.engine.generation import TokenSelector

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0, 0.9]])
    kept = TopPLogitsWarper(top_p)(None, logits / temperature) if top_p < 1 else logits / temperature
    expected = torch.softmax(kept, dim=-1)[0].double()
    select = TokenSelector(GenerationSettings(temperature=temperature, top_p=top_p, seed=5))
    n = 40_000
    tokens, _ = select.pick(logits.expand(n, -1), torch.arange(n), torch.full((n,), 3))
    frequency = torch.bincount(tokens, minlength=logits.shape[-1]).double() / n
    bound = 5 * (expected * (1 - expected) / n).sqrt() + 1e-12  # 5 standard errors
    assert ((frequency - expected).abs() <= bound).all(), (frequency, expected)
    assert (frequency[expected == 0] == 0).all()
