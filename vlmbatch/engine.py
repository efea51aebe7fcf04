"""The inference engine: vision tower once per image, then continuous batching over a KV cache.

The cache has a fixed number of slots. Requests wait in a bounded window; whenever enough slots are
free, the oldest waiting request and those closest to it in prompt length are prefilled together into
the lowest free slots (so padding stays small). Every step decodes one token for all live slots; a
finished sequence frees its slot at once, so short captions never wait for long ones. On a CPU the
decode tokens of a step that also prefills go through the same forward pass (`PaliGemma.step`).

Beam search couples beams, so with num_beams > 1 the engine runs length-bucketed static batches
through `generation.beam_search` instead.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Hashable, Iterable, Iterator, Sequence

import numpy as np
import torch

from vlmbatch.generation import GenerationSettings, TokenSelector, beam_search, finish
from vlmbatch.model.paligemma import NextTokens, PaliGemma, Prompts
from vlmbatch.processor import Processor


@dataclass
class ImageWork:
    """One decoded image (uint8 [S, S, 3]) and the prompts to run on it: (key, prompt token ids)."""

    pixels: np.ndarray
    prompts: Sequence[tuple[Hashable, list[int]]]


@dataclass
class Completion:
    key: Hashable
    tokens: list[int]  # generated ids, without the final <eos>
    finish_reason: str  # "eos" | "length"


@dataclass
class _Request:
    key: Hashable
    ids: list[int]
    features: torch.Tensor  # [num_image_tokens, hidden], shared by the questions of one image


@dataclass
class EngineStats:
    images: int = 0
    requests: int = 0
    prefills: int = 0
    decode_steps: int = 0
    mixed_steps: int = 0  # decode steps that rode along with a prefill
    generated_tokens: int = 0
    slot_steps: int = 0  # sum over decode steps of rows computed (live or not)


class Engine:
    def __init__(self, model: PaliGemma, settings: GenerationSettings, *, max_slots: int = 32,
                 max_prompt_len: int | None = None, vision_batch: int | None = None, sync_every: int | None = None,
                 static_shapes: bool | None = None, mixed_steps: bool | None = None, compile_decode: bool = False,
                 admit_at: int | None = None):
        self.model = model
        self.settings = settings
        self.device = model.device
        self.eos = model.cfg.eos_token_id
        self.pad = model.cfg.pad_token_id
        self.max_prompt_len = max_prompt_len or model.cfg.num_image_tokens + 1 + 64
        self.slots = max_slots
        self.vision_batch = vision_batch or max(1, min(max_slots, 16))
        self.window = 4 * max_slots  # how many waiting requests bucketing may choose among
        # Reading finished flags back is a host-device sync; on a GPU do it every few steps only.
        self.sync_every = sync_every or (4 if self.device.type == "cuda" else 1)
        # Static shapes: every decode step covers all slots and the whole cache width, so it needs no
        # host sync to size itself and can be captured once as a CUDA graph. On a CPU, trimming to the
        # live rows and columns is cheaper.
        self.static_shapes = self.device.type == "cuda" if static_shapes is None else static_shapes
        self.decode = model.decode
        if compile_decode:
            self.static_shapes = True
            self.decode = torch.compile(model.decode, mode="reduce-overhead", dynamic=False)
        # Mixed steps: when prompts are prefilled, the running sequences' next tokens go through the
        # same forward pass, so their rows join the prefill's matrix products instead of paying a
        # decode step of their own. On a CPU a decode step costs about as much as streaming every
        # weight from memory once; there it is always worth it. The static-shape (GPU) path keeps
        # its fixed-shape decode steps, which a CUDA graph can replay.
        self.mixed_steps = not self.static_shapes if mixed_steps is None else mixed_steps
        # Prefill once this many slots are free (or all that wait, if fewer do): a prefill of one prompt
        # multiplies the weights by ~260 rows, too few for the matrix units to run at full speed.
        self.admit_at = admit_at or max(1, max_slots // 4)
        self.select = TokenSelector(settings, self.device)
        self.stats = EngineStats()

    # -- public -----------------------------------------------------------------------------------
    def run(self, work: Iterable[ImageWork]) -> Iterator[Completion]:
        """Generate for every prompt of every image; completions arrive as they finish."""
        requests = self._requests(iter(work))
        if self.settings.num_beams > 1:
            yield from self._run_beams(requests)
        else:
            yield from self._run_continuous(requests)

    # -- vision -----------------------------------------------------------------------------------
    def _requests(self, work: Iterator[ImageWork]) -> Iterator[_Request]:
        """Encode images in batches and expand them into one request per prompt."""
        while True:
            batch = [w for _, w in zip(range(self.vision_batch), work)]
            if not batch:
                return
            pixels = torch.from_numpy(np.stack([w.pixels for w in batch]))
            if self.device.type == "cuda":
                pixels = pixels.pin_memory()
            pixels = Processor.normalize(pixels.to(self.device, non_blocking=True))
            features = self.model.encode_images(pixels)
            self.stats.images += len(batch)
            for w, feats in zip(batch, features):
                for key, ids in w.prompts:
                    if len(ids) > self.max_prompt_len:
                        raise ValueError(f"prompt of {len(ids)} tokens exceeds max_prompt_len {self.max_prompt_len}")
                    self.stats.requests += 1
                    yield _Request(key, ids, feats)

    def _fill(self, waiting: deque, requests: Iterator[_Request]) -> bool:
        """Top up the waiting window; False once the input is exhausted."""
        while len(waiting) < self.window:
            request = next(requests, None)
            if request is None:
                return False
            waiting.append(request)
        return True

    def _take_bucket(self, waiting: deque, n: int) -> list[_Request]:
        """The oldest waiting request plus the n-1 closest to it in prompt length."""
        target = len(waiting[0].ids)
        chosen = sorted(range(len(waiting)), key=lambda i: (abs(len(waiting[i].ids) - target), i))[:n]
        picked = [waiting[i] for i in sorted(chosen)]
        for i in sorted(chosen, reverse=True):
            del waiting[i]
        return picked

    def _collate(self, group: list[_Request]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids [B, T], lengths [B] and image features [B, N, H] of a group of requests."""
        lengths = torch.tensor([len(r.ids) for r in group])
        ids = torch.full((len(group), int(lengths.max())), self.pad, dtype=torch.long)
        for i, r in enumerate(group):
            ids[i, : len(r.ids)] = torch.tensor(r.ids)
        self.stats.prefills += 1
        return ids.to(self.device), lengths.to(self.device), torch.stack([r.features for r in group])

    # -- greedy / sampling: continuous batching ---------------------------------------------------
    def _run_continuous(self, requests: Iterator[_Request]) -> Iterator[Completion]:
        s, steps, dev = self.slots, self.settings.max_new_tokens, self.device
        cache = self.model.allocate_cache(s, self.max_prompt_len + steps)
        token = torch.full((s,), self.pad, dtype=torch.long, device=dev)  # last token of each slot
        col = torch.zeros(s, dtype=torch.long, device=dev)  # cache column the next token goes to
        count = torch.zeros(s, dtype=torch.long, device=dev)  # tokens generated so far
        done = torch.ones(s, dtype=torch.bool, device=dev)
        out = torch.full((s, steps + 1), self.pad, dtype=torch.long, device=dev)  # last column: discard
        owner: dict[int, Hashable] = {}  # occupied slot → request key (live, or finished and not yet reaped)
        waiting: deque[_Request] = deque()
        more = True
        since_sync = 0

        while True:
            if since_sync >= self.sync_every:  # reap finished sequences, freeing their slots
                since_sync = 0
                for i in [i for i in done.nonzero()[:, 0].tolist() if i in owner]:
                    yield self._completion(owner.pop(i), out[i, : int(count[i])].tolist())
            more = more and self._fill(waiting, requests)
            free = [i for i in range(s) if i not in owner]
            # Once the input is exhausted nothing new arrives, so wait for as many free slots as there
            # are waiting requests, up to admit_at, rather than prefilling each one alone as a slot frees.
            admit = bool(waiting and free and (len(free) >= min(self.admit_at, len(waiting)) or not owner))
            if not owner and not admit:
                return  # nothing running, nothing waiting, and the input is exhausted
            prompts = decode = None
            if admit:
                group = self._take_bucket(waiting, len(free))
                rows = torch.tensor(free[: len(group)], device=dev)
                ids, lengths, features = self._collate(group)
                prompts = Prompts(ids, lengths, features, rows)
            if owner and (prompts is None or self.mixed_steps):
                if self.static_shapes:
                    hi, width = s, None
                else:  # only rows up to the highest occupied slot, columns up to the longest of them
                    hi = max(owner) + 1
                    width = int(col[:hi].masked_fill(done[:hi], 0).max()) + 1
                live = ~done[:hi]
                # Rows without a live sequence (free, finished, or being prefilled in this very step)
                # still compute; their key and value go to the cache's spare column.
                decode = NextTokens(token[:hi], torch.where(live, col[:hi], cache.spare_col), width)
            if prompts is None:
                prefill_logits, decode_logits = None, self.decode(decode.tokens, decode.cols, cache, decode.width)
            else:
                prefill_logits, decode_logits = self.model.step(cache, prompts, decode)
            if decode is not None:
                nxt = torch.where(live, self.select(decode_logits), self.pad)
                out[:hi].scatter_(1, torch.where(live, count[:hi], steps)[:, None], nxt[:, None])
                token[:hi] = nxt
                col[:hi] += live.long()
                count[:hi] += live.long()
                done[:hi] |= live & ((nxt == self.eos) | (count[:hi] >= steps))
                self.stats.decode_steps += 1
                self.stats.slot_steps += hi
                since_sync += 1
            if prompts is not None:
                first = self.select(prefill_logits)
                token[rows], col[rows], count[rows] = first, lengths, 1
                out[rows, 0] = first
                done[rows] = (first == self.eos) | (steps == 1)
                owner.update({int(r): req.key for r, req in zip(rows.tolist(), group)})
                self.stats.mixed_steps += decode is not None
                since_sync = self.sync_every  # look at the new rows before the next step

    def _completion(self, key: Hashable, tokens: list[int]) -> Completion:
        tokens, reason = finish(tokens, self.eos)
        self.stats.generated_tokens += len(tokens)
        return Completion(key, tokens, reason)

    # -- beam search: static, length-bucketed batches ----------------------------------------------
    def _run_beams(self, requests: Iterator[_Request]) -> Iterator[Completion]:
        per_batch = max(1, self.slots // self.settings.num_beams)
        waiting: deque[_Request] = deque()
        more = True
        while True:
            more = more and self._fill(waiting, requests)
            if not waiting:
                return
            group = self._take_bucket(waiting, per_batch)
            ids, lengths, features = self._collate(group)
            results = beam_search(self.model, ids, lengths, features, self.settings, self.eos)
            for request, result in zip(group, results):
                self.stats.generated_tokens += len(result.tokens)
                yield Completion(request.key, result.tokens, result.finish_reason)
