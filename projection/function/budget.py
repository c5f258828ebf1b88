"""Bounds on the work a request asks of the teacher, checked against the teacher's sizes before any compute.

A calibration set's file size says little about the work it asks for: one latent of 4 x 2048 x 2048 (32 MB in
float16) is a million patch tokens, and the teacher's self-attention is quadratic in them. So every entry point
that runs the teacher on a set (fidelity, activation statistics, removal effects, the least-squares fit, gallery
previews) first calls `check_work` with the set's shapes, the teacher's config and the noise draws, and refuses,
in one line naming the numbers, a request over any of:

  MAX_TOKENS_PER_LATENT   patch tokens per latent, (H/2)(W/2): attention is quadratic in them. A 480 x 832 video
                          frame is a 60 x 104 latent (1,560 tokens); 720 x 1280 is 90 x 160 (3,600)
  MAX_CONTEXT_PER_LATENT  context values per latent, L x text_dim (Wan: 512 UMT5 states of 4,096 = 2^21)
  MAX_LATENT_TOKENS       latents x noise draws x tokens per latent: what every block runs over
  MAX_CONTEXT_VALUES      latents x noise draws x L x text_dim: the context the forward holds in float32
  MAX_WORK_BYTES          the bytes the request holds at its peak (`estimate_bytes`); a program may allow more on a
                          GPU (`work_limit`, `device_limit`: the CLI allows 80% of a CUDA device's memory)

`check_set` applies the per-latent bounds (they need no teacher) when a file is opened, before its data is read.

The memory estimate follows what the streamed forward (`forward.StreamedTeacher`) holds, in float32:
  the set and the noised set (`fidelity.noised_set`): latents, eps, x_s, the context repeated per draw
  the embedded inputs of every micro-batch, kept across blocks: text context [n, L, dim], modulation [n, 7, dim]
  `streams` residual streams [n, tokens, dim] (1 for one forward; more where a request keeps more: removal
  effects L + 1, per-block fidelity and the fit the teacher's embedded tokens and the students' streams too)
  the velocities of the models compared, and their float64 sums
  one micro-batch's working set inside a block (`micro_batch_bytes`): q, k, v and their float64 RoPE copies, the
  attention output, the FFN hidden layer, and the float64 copies the statistics hooks take.
n = latents x draws. Attention scores [micro-batch, heads, tokens, tokens] are not counted: torch's
scaled_dot_product_attention runs fused kernels on the CPU and on CUDA that never hold them whole (measured: 20 MB
of working memory where the scores would be 2 GiB); their cost is time, bounded by MAX_TOKENS_PER_LATENT.
The estimate is checked against measured peaks in tests/test_budget.py (it is an upper bound, within a small factor).

The teacher streams in micro-batches of at most `MICRO_BATCH` latents, fewer when one micro-batch would hold more
than MICRO_BATCH_BYTES (`micro_batch`), so each tensor operation stays short (a stop request is seen between them).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from ..arch.config import ModelConfig, as_config
from ..errors import ProjectionError

PATCH = 2  # Wan's spatial patch: one token per 2 x 2 latent pixels
MAX_TOKENS_PER_LATENT = 4096  # 128 x 128 latent pixels; a 720p frame is 3,600
MAX_CONTEXT_PER_LATENT = 1 << 22  # twice Wan's 512 x 4096 UMT5 states
MAX_LATENT_TOKENS = 1 << 21  # e.g. 64 latents x 4 draws x 3,600 tokens (720p) = 0.9M; 256 x 4 x 1,560 (480p) = 1.6M
MAX_CONTEXT_VALUES = 1 << 31  # 8 GiB in float32; e.g. 1,024 Wan latents x 1 draw x 2^21, 256 x 4
MAX_WORK_BYTES = 8 << 30  # the bound unless the program sets another (`work_limit`); the app keeps it
MICRO_BATCH = 8  # latents per micro-batch at most, unless they have fewer than MICRO_BATCH_TOKENS tokens
MICRO_BATCH_TOKENS = 512  # tokens a streamed micro-batch of small latents may reach (past 8 latents): 8 latents of
# 16 tokens are too many tiny operations; past ~512 tokens a block's intermediates pass glibc's 1 MiB mmap threshold
# (`runtime.setup_runtime`) and fault fresh pages at every operation (`projection fidelity` on the demo: 2.6 s of
# system time at 2,048 tokens, 0.5 s at 512)
MICRO_BATCH_BYTES = 256 << 20  # one micro-batch's working set inside a block, at most (one latent may need more)
F32, F64 = 4, 8


@dataclass(frozen=True)
class Work:
    """What a request asks of the teacher (all counts per request unless named per latent)."""
    latents: int
    draws: int
    tokens: int  # per latent
    context_tokens: int  # per latent
    text_dim: int
    micro_batch: int
    bytes: int  # estimated peak

    @property
    def latent_tokens(self) -> int:
        return self.latents * self.draws * self.tokens

    @property
    def context_values(self) -> int:
        return self.latents * self.draws * self.context_tokens * self.text_dim


_work_limit: ContextVar[int] = ContextVar("work_limit", default=MAX_WORK_BYTES)


@contextmanager
def work_limit(nbytes: int) -> Iterator[None]:
    """Allow requests inside this context to hold up to `nbytes` (the caller's context only, never the process's:
    the app's concurrent requests keep MAX_WORK_BYTES)."""
    token = _work_limit.set(int(nbytes))
    try:
        yield
    finally:
        _work_limit.reset(token)


def device_limit(device: Any) -> int:
    """What one request may hold on `device`: 80% of a CUDA device's memory (a 14B teacher's forward on 512 latents
    of 60x104 holds about 43 GB there, `benchmarks/gpu_check.py`), else MAX_WORK_BYTES; never less than that."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device.index or 0).total_memory
        return max(MAX_WORK_BYTES, int(0.8 * total))
    return MAX_WORK_BYTES


def tokens_per_latent(height: int, width: int) -> int:
    return (height // PATCH) * (width // PATCH)


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def micro_batch_bytes(config: ModelConfig | dict[str, Any], tokens: int, context_tokens: int, latents: int = 1) -> int:
    """The working set of `latents` latents inside one block (see the module's docstring): per token, q, k, v,
    the attention output and the residual temporaries (float32, ~12 x dim), RoPE's float64 copies of q and k
    (~6 x dim in float32 units), the statistics hooks' float64 copies of a block's input and output (4 x dim) and
    of the FFN hidden layer (2 x ffn_dim, after its float32 output and GELU, 2 x ffn_dim); per context token, the
    cross-attention's keys and values (3 x dim)."""
    config = as_config(config)
    dim, ffn = int(config.dim), int(config.ffn_dim)
    per_token = F32 * (12 * dim + 2 * ffn) + F64 * (3 * dim + 2 * dim + 2 * ffn)
    return latents * (tokens * per_token + context_tokens * 3 * dim * F32)


def micro_batch(config: ModelConfig | dict[str, Any], tokens: int, context_tokens: int, most: int = MICRO_BATCH) -> int:
    """Latents per micro-batch: at most `most`, fewer if their working set would pass MICRO_BATCH_BYTES (at
    least one)."""
    one = micro_batch_bytes(config, tokens, context_tokens)
    return max(1, min(most, MICRO_BATCH_BYTES // max(one, 1)))


def estimate_bytes(latents: Sequence[int], context: Sequence[int], config: ModelConfig | dict[str, Any], draws: int,
                   streams: float = 1, models: int = 1, batch: int | None = None, extra: int = 0) -> int:
    """Peak bytes a request holds (see the module's docstring): `latents` [N, Cin, H, W] and `context`
    [N, L, text_dim] shapes, `draws` noise draws per latent, `streams` residual streams of the teacher's width
    kept across blocks, `models` models whose embedded context and velocities are held, `batch` latents per
    micro-batch (default: `micro_batch`), `extra` bytes the request holds besides (e.g. a fit's moments)."""
    n_set, cin, h, w = (int(v) for v in latents)
    _, context_tokens, text_dim = (int(v) for v in context)
    n = n_set * draws
    tokens = tokens_per_latent(h, w)
    config = as_config(config)
    dim = int(config.dim)
    out = int(config.out_dim or cin)
    pixels = cin * h * w
    b = min(n, batch or micro_batch(config, tokens, context_tokens))
    held = F32 * (n_set * (pixels + context_tokens * text_dim)  # the set
                  + 3 * n * pixels + n * context_tokens * text_dim  # eps, x_s (and its parts), the context repeated
                  + models * n * (context_tokens + 7) * dim  # embedded context and modulation of each model
                  + streams * n * tokens * dim  # residual streams kept across blocks
                  + (models + 1) * n * out * h * w)  # velocities
    held += 4 * F64 * n * out * h * w  # the comparison's float64 sums
    return int(held + extra + micro_batch_bytes(config, tokens, context_tokens, b))


def check_set(where: str, latents: Sequence[int], context: Sequence[int]) -> None:
    """The per-latent bounds, from the shapes alone (before a file's data is read)."""
    _, _, h, w = (int(v) for v in latents)
    tokens = tokens_per_latent(h, w)
    if tokens > MAX_TOKENS_PER_LATENT:
        raise ProjectionError(f"{where}: latents of {h}x{w} are {tokens:,} tokens each (2x2 patches); the teacher "
                              f"runs at most {MAX_TOKENS_PER_LATENT:,} tokens per latent (e.g. 128x128; a 720x1280 "
                              f"frame is a 90x160 latent, 3,600 tokens): attention is quadratic in them")
    per_latent = math.prod(int(v) for v in context[1:])
    if per_latent > MAX_CONTEXT_PER_LATENT:
        raise ProjectionError(f"{where}: context of {int(context[1]):,} x {int(context[2]):,} is {per_latent:,} "
                              f"values per latent; at most {MAX_CONTEXT_PER_LATENT:,} (Wan's 512 x 4096 is 2,097,152)")


def check_work(where: str, latents: Sequence[int], context: Sequence[int], config: ModelConfig | dict[str, Any],
               draws: int, streams: float = 1, models: int = 1, batch: int | None = None, extra: int = 0) -> Work:
    """Refuse, before any compute, a request on a set of these shapes (`latents` [N, Cin, H, W], `context`
    [N, L, text_dim]) with `draws` noise draws per latent that passes a bound (see the module's docstring); the
    error names the numbers. Returns what the request asks for."""
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
        raise ProjectionError(f"noise draws: {draws!r}; expected a whole number of at least 1")
    check_set(where, latents, context)
    n, _, h, w = (int(v) for v in latents)
    context_tokens, text_dim = int(context[1]), int(context[2])
    tokens = tokens_per_latent(h, w)
    b = min(n * draws, batch or micro_batch(config, tokens, context_tokens))
    work = Work(n, draws, tokens, context_tokens, text_dim, b,
                estimate_bytes(latents, context, config, draws, streams, models, batch, extra))
    if work.latent_tokens > MAX_LATENT_TOKENS:
        raise ProjectionError(f"{where}: {n:,} latents x {draws} noise draws x {tokens:,} tokens is "
                              f"{work.latent_tokens:,} tokens per teacher block; at most {MAX_LATENT_TOKENS:,}: use "
                              "fewer latents or draws")
    if work.context_values > MAX_CONTEXT_VALUES:
        raise ProjectionError(f"{where}: {n:,} latents x {draws} noise draws x context {context_tokens:,} x "
                              f"{text_dim:,} is {work.context_values:,} context values; at most "
                              f"{MAX_CONTEXT_VALUES:,}: use fewer latents or draws")
    limit = _work_limit.get()
    if work.bytes > limit:
        raise ProjectionError(f"{where}: {n:,} latents of {h}x{w} x {draws} noise draws ({tokens:,} tokens each, "
                              f"context {context_tokens:,} x {text_dim:,}) on a teacher of width "
                              f"{as_config(config).dim} "
                              f"would hold about {_gib(work.bytes)} ({work.bytes:,} bytes) at once; at most "
                              f"{_gib(limit)}: use fewer or smaller latents, or fewer draws")
    return work


def module_config(model: Any) -> ModelConfig | None:
    """The sizes `check_work` needs, read from an in-memory WanLite (None for another module)."""
    blocks = getattr(model, "blocks", None)
    dim = getattr(model, "dim", None)
    if dim is None or not blocks or not hasattr(blocks[0], "ffn"):
        return None
    return ModelConfig(dim=dim, ffn_dim=blocks[0].ffn[0].out_features, num_heads=getattr(model, "num_heads", 1),
                       out_dim=getattr(model, "out_dim", None))
