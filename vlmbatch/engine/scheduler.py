"""The inference engine: vision tower once per image, then continuous batching over a KV cache.

The cache has a fixed number of slots. Whenever enough slots are free, the oldest waiting request and
those closest to it in prompt length are prefilled together (so padding stays small); every step decodes
one token for all live slots, and a finished sequence frees its slot at once, so short captions never
wait for long ones. On a CPU a step that prefills also carries the running sequences' next tokens. On
CUDA a decode step has fixed shapes and no host sync, so it is captured once as a CUDA graph and
replayed. Beam search couples beams: with num_beams > 1 the engine runs length-bucketed static batches
through `generation.beam_search` instead.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

import numpy as np
import torch

from vlmbatch.engine.generation import TokenSelector, beam_search, finish, stream_id
from vlmbatch.engine.hostmem import keep_freed_memory
from vlmbatch.model.memory import check_fits, kv_cache_bytes
from vlmbatch.model.paligemma import NextTokens, PaliGemma, Prompts
from vlmbatch.model.processor import Processor
from vlmbatch.spec import GenerationSettings


@dataclass
class ImageWork:
    """One decoded image (uint8 [S, S, 3]) and the prompts to run on it: (key, prompt token ids)."""

    pixels: np.ndarray
    prompts: Sequence[tuple[Hashable, list[int]]]
    context: Any = None  # the caller's, handed back on each of its completions (what their rows need)


@dataclass
class Completion:
    key: Hashable
    tokens: list[int]  # generated ids, without the final <eos>
    finish_reason: str  # "eos" | "length"
    context: Any = None  # its ImageWork's
    # Natural log-probs of the generated tokens, <eos> included when generated (see TokenSelector.pick);
    # with beams `mean_logprob` is the beam's own score (summed log-probs / length ** length_penalty).
    mean_logprob: float | None = None
    min_logprob: float | None = None

    def columns(self, text_column: str, decode: Callable[[list[int]], str]) -> dict[str, Any]:
        """What a row says of this completion."""
        return {text_column: decode(self.tokens), "num_tokens": len(self.tokens), "finish_reason": self.finish_reason,
                "mean_logprob": self.mean_logprob, "min_logprob": self.min_logprob}


@dataclass
class _Request:
    key: Hashable
    ids: list[int]
    features: torch.Tensor  # [num_image_tokens, hidden], shared by the questions of one image
    context: Any = None


@dataclass
class _Slots:
    """Per-slot decode state, updated in place (a captured CUDA graph holds these very tensors)."""

    token: torch.Tensor  # [S] last token of each slot
    col: torch.Tensor  # [S] cache column the next token goes to
    count: torch.Tensor  # [S] tokens generated so far
    done: torch.Tensor  # [S] no live sequence (free, or finished and not yet reaped)
    out: torch.Tensor  # [S, steps + 1] generated tokens; the last column takes the writes of dead rows
    stream: torch.Tensor  # [S] the sampler's stream of each slot's request (`generation.stream_id`)
    logp_sum: torch.Tensor  # [S] float32: summed log-probs of the tokens generated so far
    logp_min: torch.Tensor  # [S] float32: the least of them

    @classmethod
    def allocate(cls, slots: int, steps: int, pad: int, device: torch.device) -> "_Slots":
        def filled(*shape, value=0, dtype=torch.long):
            return torch.full(shape, value, dtype=dtype, device=device)
        return cls(token=filled(slots, value=pad), col=filled(slots), count=filled(slots),
                   done=filled(slots, value=True, dtype=torch.bool), out=filled(slots, steps + 1, value=pad),
                   stream=filled(slots), logp_sum=filled(slots, dtype=torch.float32),
                   logp_min=filled(slots, dtype=torch.float32))


@dataclass
class EngineStats:
    images: int = 0
    requests: int = 0
    prefills: int = 0
    decode_steps: int = 0
    mixed_steps: int = 0  # decode steps that rode along with a prefill
    generated_tokens: int = 0
    slot_steps: int = 0  # sum over decode steps of rows computed (live or not)
    graph_replays: int = 0  # decode steps replayed from a captured CUDA graph


def graphs_apply(device: torch.device, settings: GenerationSettings) -> bool:
    """Where the decode step is captured as a CUDA graph by default: on CUDA, for greedy decoding
    (sampling draws from its own generator, kept outside a graph; beam search runs `beam_search`)."""
    return device.type == "cuda" and not settings.sampling and settings.num_beams == 1


def capture_cuda_graph(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """Run `fn` once to warm up, record it as a CUDA graph, and return the graph's replay. `fn` must
    be a no-op on the state it updates when called here (the warm-up really runs it), and must read
    and write only tensors that outlive the graph, at fixed shapes, without a host sync."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm up on a side stream, as capture requires (cuBLAS
        fn()  # workspaces, lazily loaded kernels)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: only this thread's CUDA calls could spoil the capture, not another thread's.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return graph.replay


class Engine:
    def __init__(self, model: PaliGemma, settings: GenerationSettings, *, max_slots: int = 32,
                 max_prompt_len: int | None = None, vision_batch: int | None = None, sync_every: int | None = None,
                 static_shapes: bool | None = None, mixed_steps: bool | None = None, cuda_graph: bool = True,
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
        # CUDA graph: the static decode step, captured once per run and replayed, where `graphs_apply`
        # (cuda_graph=False: never).
        self.cuda_graph = cuda_graph and graphs_apply(self.device, settings)
        self.static_shapes = self.static_shapes or self.cuda_graph
        # Mixed steps: when prompts are prefilled, the running sequences' next tokens go through the
        # same forward pass, so their rows join the prefill's matrix products instead of paying a
        # decode step of their own. On a CPU a decode step costs about as much as streaming every
        # weight from memory once; there it is always worth it. The static-shape (GPU) path keeps
        # its fixed-shape decode steps, which a CUDA graph can replay.
        self.mixed_steps = not self.static_shapes if mixed_steps is None else mixed_steps
        # Prefill once this many slots are free (or all that wait, if fewer do): a prefill of one prompt
        # multiplies the weights by ~260 rows, too few for the matrix units to run at full speed.
        self.admit_at = admit_at or max(1, max_slots // 4)
        self.select = TokenSelector(settings)
        self.stats = EngineStats()
        if self.device.type == "cpu":  # each step's activations reuse the last step's pages
            keep_freed_memory()

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
                    yield _Request(key, ids, feats, w.context)

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
        width = self.max_prompt_len + steps
        cache_bytes = kv_cache_bytes(self.model.cfg.text, s, width, self.model.dtype)
        check_fits(dev, {f"KV cache ({s} slots x {width} tokens)": cache_bytes}, "lower --batch-size")
        cache = self.model.allocate_cache(s, width)
        st = _Slots.allocate(s, steps, self.pad, dev)
        decode_all = self._static_decode(cache, st)
        owner: dict[int, _Request] = {}  # occupied slot → its request (live, or finished and not yet reaped)
        waiting: deque[_Request] = deque()
        more = True
        since_sync = 0

        while True:
            if since_sync >= self.sync_every:  # reap finished sequences, freeing their slots
                since_sync = 0
                yield from self._reap(st, owner)
            more = more and self._fill(waiting, requests)
            free = [i for i in range(s) if i not in owner]
            # Once the input is exhausted nothing new arrives, so wait for as many free slots as there
            # are waiting requests, up to admit_at, rather than prefilling each one alone as a slot frees.
            admit = bool(waiting and free and (len(free) >= min(self.admit_at, len(waiting)) or not owner))
            if not owner and not admit:
                return  # nothing running, nothing waiting, and the input is exhausted
            if owner and (not admit or self.mixed_steps):
                self.stats.decode_steps += 1
                since_sync += 1
            if not admit:
                if self.static_shapes:
                    decode_all()
                    self.stats.slot_steps += s
                else:
                    decode, live = self._next_tokens(st, cache, owner)
                    self._advance(st, live, self.model.decode(decode.tokens, decode.cols, cache, decode.width))
                    self.stats.slot_steps += len(live)
                continue
            group = self._take_bucket(waiting, len(free))
            rows = torch.tensor(free[: len(group)], device=dev)
            ids, lengths, features = self._collate(group)
            decode = live = None
            if owner and self.mixed_steps:
                decode, live = self._next_tokens(st, cache, owner)
                self.stats.mixed_steps += 1
                self.stats.slot_steps += len(live)
            prefill_logits, decode_logits = self.model.step(cache, Prompts(ids, lengths, features, rows), decode)
            if decode is not None:
                self._advance(st, live, decode_logits)
            # The sampler's streams; greedy decoding reads none, so it builds no host tensor to copy over.
            streams = (torch.tensor([stream_id(r.key) for r in group], device=dev) if self.settings.sampling
                       else torch.zeros(len(group), dtype=torch.long, device=dev))
            first, logp = self.select.pick(prefill_logits, streams, torch.zeros_like(streams))
            st.token[rows], st.col[rows], st.count[rows], st.stream[rows] = first, lengths, 1, streams
            st.logp_sum[rows], st.logp_min[rows] = logp, logp
            st.out[rows, 0] = first
            st.done[rows] = (first == self.eos) | (steps == 1)
            owner.update(zip(rows.tolist(), group))
            since_sync = self.sync_every  # look at the new rows before the next step

    def _next_tokens(self, st: _Slots, cache, owner: dict[int, _Request] | None) -> tuple[NextTokens, torch.Tensor]:
        """A step's decode part and which of its rows are live: with static shapes every slot over the
        whole cache width, else only rows up to the highest occupied slot and columns up to the longest
        of them (`owner`: the occupied slots). Rows without a live sequence (free, finished, or being
        prefilled in this very step) still compute; their key and value go to the cache's spare column."""
        hi, width = self.slots, None
        if not self.static_shapes:
            hi = max(owner) + 1
            width = int(st.col[:hi].masked_fill(st.done[:hi], 0).max()) + 1
        live = ~st.done[:hi]
        return NextTokens(st.token[:hi], torch.where(live, st.col[:hi], cache.spare_col), width), live

    def _advance(self, st: _Slots, live: torch.Tensor, logits: torch.Tensor) -> None:
        """Record the next token of each live row among the first len(live) slots (no host sync)."""
        hi, steps = len(live), self.settings.max_new_tokens
        chosen, logp = self.select.pick(logits, st.stream[:hi], st.count[:hi])
        nxt = torch.where(live, chosen, self.pad)
        st.logp_sum[:hi] += torch.where(live, logp, 0.0)
        st.logp_min[:hi] = torch.where(live, torch.minimum(st.logp_min[:hi], logp), st.logp_min[:hi])
        st.out[:hi].scatter_(1, torch.where(live, st.count[:hi], steps)[:, None], nxt[:, None])
        st.token[:hi] = nxt
        st.col[:hi] += live.long()
        st.count[:hi] += live.long()
        st.done[:hi] |= live & ((nxt == self.eos) | (st.count[:hi] >= steps))

    def _static_decode(self, cache, st: _Slots) -> Callable[[], None]:
        """The fixed-shape decode step over every slot and the whole cache width: as a replayed CUDA
        graph when `cuda_graph`, else run as is. Made while every slot is free, so the warm-up run
        before capture changes nothing but the discard column and the cache's spare column."""

        def step() -> None:
            decode, live = self._next_tokens(st, cache, owner=None)
            self._advance(st, live, self.model.decode(decode.tokens, decode.cols, cache))

        if not self.cuda_graph:
            return step
        try:
            replay = capture_cuda_graph(step, self.device)
        except RuntimeError as exc:  # slower, not wrong: say so once and run the same step eagerly
            warnings.warn(f"CUDA graph capture of the decode step failed, decoding without it: {exc}",
                          RuntimeWarning, stacklevel=2)
            self.cuda_graph = False
            return step

        def replayed() -> None:
            replay()
            self.stats.graph_replays += 1

        return replayed

    def _reap(self, st: _Slots, owner: dict[int, _Request]) -> Iterator[Completion]:
        """The completions of the occupied slots whose sequence finished, freeing those slots (one
        host-device sync for them all)."""
        finished = [i for i in st.done.nonzero()[:, 0].tolist() if i in owner]
        if not finished:
            return
        counts, sums, mins = (values[finished].tolist() for values in (st.count, st.logp_sum, st.logp_min))
        for i, out, count, total, least in zip(finished, st.out[finished].tolist(), counts, sums, mins):
            request = owner.pop(i)
            tokens, reason = finish(out[:count], self.eos)
            self.stats.generated_tokens += len(tokens)
            yield Completion(request.key, tokens, reason, request.context, mean_logprob=total / count,
                             min_logprob=least)

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
                yield Completion(request.key, result.tokens, result.finish_reason, request.context,
                                 mean_logprob=result.score, min_logprob=result.min_logprob)
