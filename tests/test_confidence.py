"""Each completion's confidence (`mean_logprob`, `min_logprob`) against transformers: greedy through
`compute_transition_scores`, sampling through transformers' own warpers on the logits of the same
tokens, beam search through the beam's `sequences_scores`; the same whatever the engine's batching."""

from __future__ import annotations

import pytest
import torch
from test_parity import PROMPTS, ours

from vlmbatch.engine.scheduler import Engine, ImageWork
from vlmbatch.sources.images import resize_square
from vlmbatch.spec import GenerationSettings

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def images(photos):
    return [photos[n].convert("RGB") for n in ["astronaut", "chelsea", "coffee", "rocket", "camera"]]


def completions(model, processor, images, prompts, settings, slots=8, **engine_kw) -> list:
    size = model.cfg.vision.image_size
    work = [ImageWork(resize_square(image, size), [(i, processor.prompt_ids(p))])
            for i, (image, p) in enumerate(zip(images, prompts))]
    done = {c.key: c for c in Engine(model, settings, max_slots=slots, **engine_kw).run(work)}
    return [done[i] for i in range(len(prompts))]


def generated_length(completion) -> int:
    """Tokens the confidence covers: the generated ones, and <eos> when it was generated."""
    return len(completion.tokens) + (completion.finish_reason == "eos")


def reference(ckpt, images, prompts, **generate_kw):
    processor = ckpt.processor()
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding="longest")
    with torch.no_grad():
        out = ckpt.hf.generate(**inputs, return_dict_in_generate=True, **generate_kw)
    return out, inputs["input_ids"].shape[1]


def assert_confidence(got, mean: float, least: float):
    assert got.mean_logprob == pytest.approx(mean, abs=TOLERANCE)
    assert got.min_logprob == pytest.approx(least, abs=TOLERANCE)


@pytest.mark.parametrize("variant", ["pg1_untied", "pg2"])
def test_greedy_confidence_equals_compute_transition_scores(make_ckpt, images, variant):
    ckpt = make_ckpt(variant, eos_boost=2.0)
    model, processor = ours(ckpt)
    settings = GenerationSettings(max_new_tokens=10)
    got = completions(model, processor, images, PROMPTS, settings)
    out, _ = reference(ckpt, images, PROMPTS, do_sample=False, max_new_tokens=10, output_scores=True)
    scores = ckpt.hf.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    assert {c.finish_reason for c in got} == {"eos", "length"}  # both kinds of ending are covered
    for completion, row in zip(got, scores):
        row = row[: generated_length(completion)]
        assert_confidence(completion, row.mean().item(), row.min().item())


class _Follow:
    """A logits processor that makes transformers' generate take the given tokens, step by step."""

    def __init__(self, tokens: list[list[int]], prompt_len: int, pad: int):
        self.tokens, self.prompt_len, self.pad = tokens, prompt_len, pad

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, float("-inf"))
        for row, tokens in enumerate(self.tokens):
            forced[row, tokens[step] if step < len(tokens) else self.pad] = 0.0
        return forced


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_confidence_equals_transformers_warped_scores(ckpt_pg1_untied, images, temperature, top_p):
    """The log-prob of each sampled token under the distribution it was drawn from: transformers'
    temperature and top-p warpers applied to its logits for the same tokens, then normalized."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    model, processor = ours(ckpt_pg1_untied)
    settings = GenerationSettings(max_new_tokens=8, temperature=temperature, top_p=top_p, seed=11)
    got = completions(model, processor, images, PROMPTS, settings)
    eos = ckpt_pg1_untied.ids["eos"]
    taken = [c.tokens + ([eos] if c.finish_reason == "eos" else []) for c in got]
    hf_processor = ckpt_pg1_untied.processor()
    hf_processor.tokenizer.padding_side = "left"
    prompt_len = hf_processor(text=PROMPTS, images=images, return_tensors="pt", padding="longest")["input_ids"].shape[1]
    out, _ = reference(ckpt_pg1_untied, images, PROMPTS, do_sample=False, max_new_tokens=8, output_logits=True,
                       logits_processor=LogitsProcessorList([_Follow(taken, prompt_len, ckpt_pg1_untied.ids["pad"])]))
    warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
    warped = []
    for step, logits in enumerate(out.logits):
        scores = logits.float()
        for warp in warpers:
            scores = warp(out.sequences[:, : prompt_len + step], scores)
        warped.append(scores)
    transition = ckpt_pg1_untied.hf.compute_transition_scores(out.sequences, tuple(warped), normalize_logits=True)
    for completion, tokens, row in zip(got, taken, transition):
        assert out.sequences[got.index(completion), prompt_len:prompt_len + len(tokens)].tolist() == tokens
        row = row[: len(tokens)]
        assert_confidence(completion, row.mean().item(), row.min().item())


@pytest.mark.parametrize("variant", ["pg1_untied", "pg2"])
def test_beam_confidence_is_the_beams_own_score(make_ckpt, images, variant):
    ckpt = make_ckpt(variant, eos_boost=2.0)
    model, processor = ours(ckpt)
    settings = GenerationSettings(max_new_tokens=10, num_beams=2)
    got = completions(model, processor, images[:4], PROMPTS[:4], settings)
    out, _ = reference(ckpt, images[:4], PROMPTS[:4], do_sample=False, num_beams=2, max_new_tokens=10,
                       output_scores=True)
    transition = ckpt.hf.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
    for completion, score, row in zip(got, out.sequences_scores.tolist(), transition):
        assert_confidence(completion, score, row[: generated_length(completion)].min().item())


@pytest.mark.parametrize("engine_kw", [dict(slots=2), dict(slots=8, mixed_steps=False),
                                       dict(slots=8, static_shapes=True, sync_every=3)], ids=str)
def test_confidence_is_the_same_whatever_the_batching(ckpt_pg1_untied, images, engine_kw):
    model, processor = ours(ckpt_pg1_untied)
    for settings in (GenerationSettings(max_new_tokens=10), GenerationSettings(max_new_tokens=8, temperature=1.0, seed=3)):
        baseline = completions(model, processor, images, PROMPTS, settings)
        slots = engine_kw.pop("slots", 8)
        other = completions(model, processor, images, PROMPTS, settings, slots=slots, **engine_kw)
        engine_kw["slots"] = slots
        for a, b in zip(baseline, other):
            assert a.tokens == b.tokens
            assert a.mean_logprob == pytest.approx(b.mean_logprob, abs=1e-5)
            assert a.min_logprob == pytest.approx(b.min_logprob, abs=1e-5)
            assert a.min_logprob <= a.mean_logprob <= 0


def test_rows_carry_the_engines_confidence(ckpt_pg1_untied, images, tmp_path):
    """A caption run's rows hold what the engine gave for the same image; an error row holds none."""
    from typer.testing import CliRunner

    import pyarrow.parquet as pq
    from vlmbatch.cli import app

    folder = tmp_path / "images"
    folder.mkdir()
    images[0].save(folder / "a.png")
    (folder / "broken.png").write_bytes(b"no image")
    out = tmp_path / "caps.parquet"
    result = CliRunner().invoke(app, ["caption", str(folder), "--out", str(out), "--model", str(ckpt_pg1_untied.path),
                                      "--max-new-tokens", "6", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = {row["id"]: row for row in pq.read_table(out).to_pylist()}
    model, processor = ours(ckpt_pg1_untied)
    [completion] = completions(model, processor, images[:1], ["caption en"], GenerationSettings(max_new_tokens=6))
    assert rows["a.png"]["mean_logprob"] == pytest.approx(completion.mean_logprob, abs=1e-5)
    assert rows["a.png"]["min_logprob"] == pytest.approx(completion.min_logprob, abs=1e-5)
    assert rows["broken.png"]["mean_logprob"] is None and rows["broken.png"]["min_logprob"] is None
