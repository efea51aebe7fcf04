"""Gemma and Gemma 2 decoders with a slot-addressed KV cache.

Each sequence owns one cache row ("slot") and stores its token at column `position - 1` (positions are
1-indexed, as in the reference), so a row is always compact; one spare column takes the writes of rows
in a decode batch that hold no live sequence. A forward pass (`Step`) runs a flat list of tokens made of
a prefill (whole prompts, bidirectional over each row's real tokens: a PaliGemma prompt is all prefix)
and/or a decode part (one token per row, causal, within the sliding window on Gemma 2's local layers).
Everything but attention is token-wise, so decode tokens riding along with a prefill share its matrix
products instead of paying a pass over the weights of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmbatch.model.blocks import Linear, in_row_blocks
from vlmbatch.model.config import TextConfig


@dataclass
class KVCache:
    """Per-layer key/value tensors of shape [slots, kv_heads, max_len + 1, head_dim]; the last column
    (`spare_col`) is written, never read, by decode rows without a live sequence."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @staticmethod
    def shape(cfg: TextConfig, slots: int, max_len: int) -> tuple[int, int, int, int]:
        """One layer's keys (or values): [slots, kv_heads, max_len + 1, head_dim]."""
        return (slots, cfg.num_key_value_heads, max_len + 1, cfg.head_dim)

    @classmethod
    def allocate(cls, cfg: TextConfig, slots: int, max_len: int, device, dtype) -> "KVCache":
        shape = cls.shape(cfg, slots, max_len)
        make = lambda: [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]  # noqa: E731
        return cls(k=make(), v=make())

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2] - 1

    @property
    def spare_col(self) -> int:
        return self.max_len

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Row dst[i] becomes a copy of row src[i] (beam search reorders its beams this way)."""
        for tensors in (self.k, self.v):
            for t in tensors:
                t[dst] = t[src]


@dataclass
class Step:
    """Where one forward pass reads and writes in the cache.

    Tokens are flat: first the prefill part, `prompt_rows` prompts of `prompt_len` tokens (right-padded), then
    the decode part, one token for each of cache rows 0..decode_rows-1.
    rows, cols: each token's cache row and column, [N]; its position is col + 1.
    masks: boolean attention masks per part, keyed by sliding window (None = global): prefill attends
    to its own new tokens ([B, 1, 1, T]); decode to the cache view rows [0, n) x columns [0, width)
    ([n, 1, 1, width]).
    outputs: which tokens' hidden states the caller needs (None: all). The last layer computes queries,
    attention and MLP for these tokens only (their keys and values, which others attend to, for all).
    """

    rows: torch.Tensor
    cols: torch.Tensor
    prompt_rows: int = 0
    prompt_len: int = 0
    prompt_masks: dict[int | None, torch.Tensor] | None = None
    decode_rows: int = 0
    width: int = 0
    decode_masks: dict[int | None, torch.Tensor] | None = None
    outputs: torch.Tensor | None = None

    @classmethod
    def build(cls, windows, *, prefill: tuple[torch.Tensor, torch.Tensor, int] | None = None,
              decode: tuple[torch.Tensor, int] | None = None) -> "Step":
        """prefill: (rows [B], lengths [B], T), prompts right-padded to T, of which only each one's last
        real token is wanted out. decode: (cols [n], width), one token for each of rows 0..n-1 at cache
        column cols[i] < width (or the spare column), every one wanted out."""
        if prefill is None and decode is None:
            raise ValueError("a step needs a prefill part, a decode part or both")
        rows, cols, outputs, fields, offset = [], [], [], {}, 0
        if prefill is not None:
            prompt_rows, lengths, t = prefill
            b, dev = len(prompt_rows), lengths.device
            col = torch.arange(t, device=dev)
            valid = (col[None, :] < lengths[:, None])[:, None, None, :]
            rows.append(prompt_rows.repeat_interleave(t))
            cols.append(col.repeat(b))
            outputs.append(torch.arange(b, device=dev) * t + lengths - 1)
            fields.update(prompt_rows=b, prompt_len=t, prompt_masks={w: valid for w in windows})
            offset = b * t
        if decode is not None:
            decode_cols, width = decode
            n, dev = len(decode_cols), decode_cols.device
            k, q = torch.arange(width, device=dev)[None, :], decode_cols[:, None]
            masks = {}
            for w in windows:
                visible = k <= q if w is None else (k <= q) & (k > q - w)
                masks[w] = visible[:, None, None, :]
            rows.append(torch.arange(n, device=dev))
            cols.append(decode_cols)
            outputs.append(offset + torch.arange(n, device=dev))
            fields.update(decode_rows=n, width=width, decode_masks=masks)
        return cls(rows=torch.cat(rows), cols=torch.cat(cols), **fields,
                   # A decode step alone wants every token out: no selection.
                   outputs=torch.cat(outputs) if prefill is not None else None)

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_rows * self.prompt_len


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32, scaled by (1 + weight)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # Computed on the CPU even while the model is built on the meta device (where this arithmetic
        # would route through torch's reference ops and import the compiler, over a second).
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        inv_freq = 1.0 / theta**exponents
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for tokens at `positions` [N], shaped [N, 1, head_dim] to broadcast over heads."""
        freqs = positions.float()[:, None] * self.inv_freq  # float32 like the reference
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_logit_softcapping
        self.window = cfg.layer_window(layer)
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope, k_cache: torch.Tensor, v_cache: torch.Tensor, step: Step,
                select: torch.Tensor | None = None) -> torch.Tensor:
        """x: the step's tokens [N, hidden]. Every token's key and value go to the cache; queries (and
        the output) are those of all tokens, or of the tokens `select`ed."""
        n_tok, heads, kv, d = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        k = apply_rope(self.k_proj(x).view(n_tok, kv, d), *rope)
        v = self.v_proj(x).view(n_tok, kv, d)
        k_cache[step.rows, :, step.cols] = k
        v_cache[step.rows, :, step.cols] = v
        if select is not None:
            x, rope = x[select], tuple(r[select] for r in rope)
        q = apply_rope(self.q_proj(x).view(x.shape[0], heads, d), *rope)

        out = q.new_empty(q.shape[0], heads * d)
        if step.prompt_rows:
            # Each prompt over its own keys and values (fresh, not read back from the cache).
            b, t = step.prompt_rows, step.prompt_len
            tq = (q.shape[0] - step.decode_rows) // b  # t, or 1 when only the last token is wanted
            qp = q[: b * tq].view(b, tq, heads, d).transpose(1, 2)
            kp, vp = (z[: step.prefill_tokens].view(b, t, kv, d).transpose(1, 2) for z in (k, v))
            attended = self._attend(qp, kp, vp, step.prompt_masks[self.window])
            out[: b * tq].view(b, tq, heads, d).copy_(attended.transpose(1, 2))
        if step.decode_rows:
            # Over the rows' cached tokens (a view, no copy). With one query per head, the heads that
            # share a key/value head become that head's query rows, so each cached key is read once
            # rather than once per head (2.5x faster attention on a CPU).
            n, groups = step.decode_rows, heads // kv
            qd = q[-n:].view(n, kv, groups, d)
            kd, vd = k_cache[:n, :, : step.width], v_cache[:n, :, : step.width]
            out[-n:].view(n, kv, groups, d).copy_(self._attend(qd, kd, vd, step.decode_masks[self.window]))
        return self.o_proj(out)

    def _attend(self, q, k, v, mask) -> torch.Tensor:
        """Queries [B, H, T, D] over keys and values [B, KV, S, D], H a multiple of KV."""
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        # Gemma 2 caps the logits with tanh before the softmax, which SDPA cannot express.
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_row_blocks(self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.up_proj.times(x, self.gate_proj.gelu_tanh(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.sandwich = cfg.is_gemma2  # Gemma 2 also normalizes each block's output
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, k_cache, v_cache, step: Step, select: torch.Tensor | None = None) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), rope, k_cache, v_cache, step, select)
        if select is not None:
            x = x[select]
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class GemmaDecoder(nn.Module):
    """Token embeddings → decoder layers → final norm. The LM head lives in `PaliGemma`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.windows = sorted({cfg.layer_window(i) for i in range(cfg.num_hidden_layers)}, key=lambda w: w or 0)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings, scaled by sqrt(hidden) in the weights' dtype as the reference does."""
        scale = torch.tensor(self.cfg.hidden_size**0.5, dtype=self.embed_tokens.weight.dtype)
        return self.embed_tokens(ids) * scale

    def forward(self, x: torch.Tensor, cache: KVCache, step: Step) -> torch.Tensor:
        """The step's tokens [N, hidden] → hidden states of its `outputs` tokens (all N when None).

        Only the last layer's output is read out, so that layer computes its queries, attention output
        and MLP for the output tokens only (its keys and values, which later tokens attend to, still for
        all): a prompt of 258 tokens skips most of one layer.
        """
        rope = self.rotary(step.cols + 1, x.dtype)
        final = len(self.layers) - 1
        for i, (layer, k_cache, v_cache) in enumerate(zip(self.layers, cache.k, cache.v)):
            x = layer(x, rope, k_cache, v_cache, step, step.outputs if i == final else None)
        return self.norm(x)
