"""Decoding rules: next-token selection and beam search (the settings are `vlmbatch.spec`'s).

Greedy and sampling are per-token rules that the continuous-batching `Engine` applies to whatever rows
are live. Beam search couples a request's beams, so it runs on a static batch here; it follows
transformers' beam search exactly (top 2·beams candidates per step, finished scores divided by the
generated length, its early-stop heuristic), so outputs are token-identical to the reference.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Hashable

import torch

from vlmbatch.model.paligemma import PaliGemma
from vlmbatch.spec import GenerationSettings


class TokenSelector:
    """Greedy argmax, or temperature + nucleus (top-p) sampling.

    A sampled token depends only on the seed, its request's stream id and its step: the draw is the
    Gumbel-max trick (argmax of logits/T + Gumbel noise, an exact sample from softmax(logits/T) over
    the top-p set) with noise from a counter-based hash of (seed, stream, step, token id). So the same
    seed gives the same captions whatever the batch size, slot, device or order, and a resumed run
    samples the rest exactly as one uninterrupted run would have.
    """

    def __init__(self, settings: GenerationSettings):
        self.settings = settings
        seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(8), "little")
        self._seed = _signed(seed & _MASK64)
        self._mixed_seed: torch.Tensor | None = None  # made on the logits' device at the first draw

    def pick(self, logits: torch.Tensor, streams: torch.Tensor | None = None,
             steps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(next token, its natural log-probability) of each row of `logits` [B, V]; sampling needs each
        row's `streams` and `steps` ([B] int64: its request's `stream_id` and how many tokens it has
        generated). The log-probability is under the distribution the token was chosen from, as
        transformers' `compute_transition_scores(..., normalize_logits=True)` gives it (greedy: softmax of
        the logits; sampling: of the tempered, top-p filtered logits)."""
        logits = logits.float()
        if not self.settings.sampling:
            tokens = logits.argmax(dim=-1)
            return tokens, _log_prob(logits, tokens)
        logits = logits / self.settings.temperature
        if self.settings.top_p < 1.0:
            logits = top_p_filter(logits, self.settings.top_p)
        if self._mixed_seed is None:
            self._mixed_seed = _mix(torch.tensor([self._seed], dtype=torch.int64, device=logits.device))
        tokens = (logits + gumbel_noise(self._mixed_seed, streams, steps, logits.shape[-1])).argmax(dim=-1)
        return tokens, _log_prob(logits, tokens)


def _log_prob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per row, without materializing the whole log-softmax."""
    return logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def stream_id(key: Hashable) -> int:
    """A request's stream of random draws: a stable 64-bit hash of its key (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little", signed=True)


_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps, as in C)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def gumbel_noise(seed: torch.Tensor, streams: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise [B, vocab], a pure function of (seed, streams[b], steps[b], token id)."""
    row = _mix(_mix(seed ^ streams.to(torch.int64)) ^ steps.to(torch.int64))  # [B]
    tokens = torch.arange(vocab, device=row.device, dtype=torch.int64)
    bits = _mix(row[:, None] ^ _mix(tokens)[None, :])
    uniform = (_shr(bits, 11).double() + 0.5) / float(1 << 53)  # in (0, 1)
    return -torch.log(-torch.log(uniform)).float()


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@dataclass
class BeamOutput:
    tokens: list[int]  # without the final <eos>
    finish_reason: str  # "eos" or "length"
    score: float  # the beam's own score: its tokens' summed log-probs / length ** length_penalty
    min_logprob: float  # its least likely token's log-prob (<eos> included)
    logprobs: list[float]  # each token's of `tokens`


@torch.inference_mode()
def beam_search(model: PaliGemma, ids: torch.Tensor, lengths: torch.Tensor, image_features: torch.Tensor,
                settings: GenerationSettings, eos_id: int) -> list[BeamOutput]:
    """Beam search for a right-padded batch of prompts; one best sequence per prompt."""
    n, k, steps = len(ids), settings.num_beams, settings.max_new_tokens
    keep = 2 * k  # candidates per step: enough that k stay alive when k of them end with <eos>
    device = ids.device
    cache = model.allocate_cache(n * k, int(lengths.max()) + steps)
    logits = model.prefill(ids, lengths, image_features, cache, rows=torch.arange(n, device=device) * k)
    for beam in range(1, k):  # every beam starts from its prompt's cache
        cache.copy_rows(torch.arange(n, device=device) * k + beam, torch.arange(n, device=device) * k)
    logits = logits.repeat_interleave(k, dim=0)
    cols = lengths.to(device).repeat_interleave(k)

    running = torch.zeros(n, k, steps, dtype=torch.long, device=device)
    running_lp = torch.zeros(n, k, steps, device=device)  # each token's log-prob, along each beam
    running_scores = torch.full((n, k), -1e9, device=device)
    running_scores[:, 0] = 0.0  # at first all beams are the same: only one may expand
    done = torch.zeros(n, k, steps, dtype=torch.long, device=device)
    done_lp = torch.zeros(n, k, steps, device=device)
    done_scores = torch.full((n, k), -1e9, device=device)
    done_len = torch.zeros(n, k, dtype=torch.long, device=device)
    done_flag = torch.zeros(n, k, dtype=torch.bool, device=device)
    improvable = torch.ones(n, 1, dtype=torch.bool, device=device)
    top_k_mask = torch.arange(keep, device=device) < k
    batch_offset = torch.arange(n, device=device)[:, None] * k

    for t in range(steps):
        vocab = logits.shape[-1]
        token_lp = torch.log_softmax(logits, dim=-1).view(n, k * vocab)
        scores = token_lp.view(n, k, vocab) + running_scores[..., None]
        cand_scores, flat = torch.topk(scores.view(n, -1), keep)
        cand_beam, cand_token = flat // vocab, flat % vocab
        cand = running.gather(1, cand_beam[..., None].expand(-1, -1, steps)).clone()
        cand[:, :, t] = cand_token
        cand_lp = running_lp.gather(1, cand_beam[..., None].expand(-1, -1, steps)).clone()
        cand_lp[:, :, t] = token_lp.gather(1, flat)
        ends = (cand_token == eos_id) | (t + 1 >= steps)

        # Beams that go on: the best k candidates that did not just end.
        alive_scores = cand_scores + ends.float() * -1e9
        nxt = torch.topk(alive_scores, k).indices
        running = cand.gather(1, nxt[..., None].expand(-1, -1, steps))
        running_lp = cand_lp.gather(1, nxt[..., None].expand(-1, -1, steps))
        running_scores = alive_scores.gather(1, nxt)
        source_beam = cand_beam.gather(1, nxt)

        # Finished hypotheses: merge those that just ended (among the top k) with the kept ones.
        final = cand_scores / ((t + 1) ** settings.length_penalty)
        final = final + (~improvable).float() * -1e9 + (~(ends & top_k_mask)).float() * -1e9
        merged_scores = torch.cat((done_scores, final), dim=1)
        best = torch.topk(merged_scores, k).indices
        done = torch.cat((done, cand), dim=1).gather(1, best[..., None].expand(-1, -1, steps))
        done_lp = torch.cat((done_lp, cand_lp), dim=1).gather(1, best[..., None].expand(-1, -1, steps))
        done_scores = merged_scores.gather(1, best)
        done_len = torch.cat((done_len, torch.full_like(cand_token, t + 1)), dim=1).gather(1, best)
        done_flag = torch.cat((done_flag, ends & top_k_mask), dim=1).gather(1, best)

        # Early stop: can the best running beam still beat the worst finished one?
        best_running = running_scores[:, :1] / ((t + 1) ** settings.length_penalty)
        worst_done = torch.where(done_flag, done_scores.min(dim=1, keepdim=True).values, -1e9)
        improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
        if not improvable.any() or ends.all() or t + 1 == steps:
            break

        rows = (source_beam + batch_offset).flatten()
        cache.copy_rows(torch.arange(n * k, device=device), rows)
        logits = model.decode(running[:, :, t].flatten(), cols + t, cache)

    outputs = []
    for i in range(n):
        length = int(done_len[i, 0])
        tokens, reason = finish(done[i, 0, :length].tolist(), eos_id)
        logprobs = done_lp[i, 0, :length].tolist()
        outputs.append(BeamOutput(tokens, reason, score=float(done_scores[i, 0]), min_logprob=min(logprobs),
                                  logprobs=logprobs[: len(tokens)]))
    return outputs


def finish(tokens: list[int], eos_id: int) -> tuple[list[int], str]:
    """A finished sequence's tokens without the final <eos>, and why it ended ("eos" or "length")."""
    if tokens and tokens[-1] == eos_id:
        return tokens[:-1], "eos"
    return tokens, "length"
