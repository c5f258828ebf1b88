"""The teacher's function, streamed: one block of weights in memory at a time.

A teacher of any size whose family carries a runnable block (`family.Runnable`) runs on a calibration batch on one
latent frame (where Wan is exactly `WanLite`): the embeddings and head stay in memory (for Wan 14B about 0.7 GB in
float32), then each block's tensors are read from the checkpoint onto the device, the whole batch goes through the
family's block in micro-batches, its output is kept, and its weights are released before the next block is read.
For Wan the math is `WanLite`'s own modules, so this equals the in-memory model (and diffusers'
`WanTransformer3DModel` on one frame).

`on_block(i, x_in, x_out)` sees every block's input and output residual stream [B, tokens, D] (float32), for
statistics and per-block fidelity.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from ..arch.anatomy import FAMILIES
from ..arch.family import Runnable
from ..arch.layout import build_student
from ..arch.wan import WanLite
from ..core.models import ModelView
from ..cancel import checkpoint
from ..errors import ProjectionError
from . import budget

BlockHook = Callable[[int, torch.Tensor, torch.Tensor], None]
InputHook = Callable[[int, str, torch.Tensor], None]
Rider = Callable[[int, nn.Module], None]  # (block index, the block, its weights read)


def top_keys(model: WanLite) -> list[str]:
    return [k for k in model.state_dict() if not k.startswith("blocks.")]


def runnable(teacher: ModelView, block: int = 0) -> Runnable:
    """How a teacher block runs: its stack's runnable block and tables (the first stack's by default)."""
    family = FAMILIES.get(teacher.family or "")
    found = family.runnable_at(block, teacher.config) if family is not None else None
    if found is None:
        stack = family.stack_of(block, teacher.config) if family is not None else 0
        where = f" for block {block} (stack {stack})" if stack else ""
        raise ProjectionError(f"{teacher.source}: its family ({teacher.family or 'unknown names'}) has no runnable "
                              f"block here{where}")
    return found


def build_block(teacher: ModelView, index: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Teacher block `index` as its stack's module on `device` (its tensors read now, nothing else)."""
    with torch.device("meta"):
        block = runnable(teacher, index).block(teacher.config)
    prefix = f"blocks.{index}."
    block.load_state_dict({k: teacher.read(prefix + k) for k in block.state_dict()}, assign=True, strict=True)
    return block.to(device, dtype).eval()


class StreamedTeacher:
    """forward(x [B, Cin, H, W], t [B], context [B, L, text_dim]) -> velocity [B, Cout, H, W], streaming blocks."""

    streams = True  # callers pass whole sets, not batches: every call reads every block once

    def __init__(self, teacher: ModelView, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 micro_batch: int | None = None, blocks: list[int] | None = None):
        """blocks: which teacher blocks run, in order (default all: the teacher; fewer: the teacher without the
        others, as a depth-only student computes). micro_batch: latents per micro-batch at most (None: MICRO_BATCH, or
        as many as make MICRO_BATCH_TOKENS tokens: small latents in batches of 8 are too many tiny operations);
        fewer where their working set inside a block would pass budget.MICRO_BATCH_BYTES (`chunks`)."""
        depth = int(teacher.config.num_layers)
        for b in range(depth):  # refused here, before anything is read, if its family's blocks cannot run
            runnable(teacher, b)
        patch = teacher.shapes.get("patch_embedding.weight")
        if patch is None or len(patch) != 5 or patch[2] != 1:
            raise ProjectionError(f"{teacher.source}: the streamed forward runs teachers whose patch embedding is "
                                  "[D, C, 1, 2, 2] (one latent frame)")
        self.teacher, self.device, self.dtype = teacher, torch.device(device), dtype
        self.fixed = micro_batch is not None
        self.micro_batch = max(1, micro_batch) if micro_batch is not None else budget.MICRO_BATCH
        self.blocks = list(range(depth)) if blocks is None else list(blocks)
        if any(not 0 <= b < depth for b in self.blocks):
            raise ProjectionError(f"blocks {self.blocks}: the teacher has blocks 0..{depth - 1}")
        shell = build_student(replace(teacher.config, layout="wanlite", num_layers=0, stack_layers=()), "meta")
        state = {k: teacher.read(k) for k in top_keys(shell)}
        state["patch_embedding.weight"] = state["patch_embedding.weight"].squeeze(2)
        shell.load_state_dict(state, assign=True, strict=True)
        self.shell: WanLite = shell.to(self.device, dtype).eval()  # embeddings and head only

    def chunks(self, x: torch.Tensor, context: torch.Tensor) -> list[slice]:
        """The micro-batches of a set (x [B, Cin, H, W], context [B, L, text_dim]): latents whose tokens the
        teacher may run (`budget.check_set`), in batches small enough that each block step is short."""
        budget.check_set("the teacher's input", tuple(x.shape), tuple(context.shape))
        tokens = budget.tokens_per_latent(*x.shape[-2:])
        most = self.micro_batch if self.fixed else max(self.micro_batch, budget.MICRO_BATCH_TOKENS // max(tokens, 1))
        step = budget.micro_batch(self.teacher.config, tokens, context.shape[1], most)
        return [slice(i, i + step) for i in range(0, len(x), step)]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 on_block: BlockHook | None = None, on_input: InputHook | None = None,
                 inputs_of: Callable[[int], Sequence[str]] = lambda block: (), on_weights: Rider | None = None,
                 riders: Sequence[Rider] = ()) -> torch.Tensor:
        """on_input(block, module name, input) sees the input of each module `inputs_of(block)` names (e.g.
        'ffn.2': the GELU output) in every block, per micro-batch; on_weights(block, module) each block's weights
        while they are in memory; `riders` (`walk`) each block after this stream, the hooks above removed, so that
        other measurements share this pass over the weights."""
        chunks = self.chunks(x, context)
        parts = [self.shell.embed(x[c].to(self.device), t[c].to(self.device), context[c].to(self.device))
                 for c in chunks]
        hidden = [p.tokens for p in parts]
        for p in parts:
            p.tokens = None  # the residual stream lives in `hidden` alone: one copy of it across blocks

        def stream(index: int, block: nn.Module) -> None:
            if on_weights is not None:
                on_weights(index, block)
            hooks = [block.get_submodule(name).register_forward_pre_hook(
                lambda m, args, name=name: on_input(index, name, args[0].float()))
                for name in (inputs_of(index) if on_input is not None else ())]
            for j, p in enumerate(parts):
                out = step(block, hidden[j], p)
                if on_block is not None:
                    on_block(index, hidden[j].float(), out.float())
                hidden[j] = out
            for hook in hooks:
                hook.remove()

        self.walk([stream, *riders])
        return torch.cat([self.shell.unpatchify(h, p.e, p.grid).float().cpu() for h, p in zip(hidden, parts)])

    @torch.no_grad()
    def walk(self, riders: Sequence[Rider]) -> None:
        """One pass over the weights: each block in `self.blocks` read once and handed to every rider in turn
        (rider(index, module)), then released before the next block is read."""
        for index in self.blocks:
            checkpoint()  # a cancelled request stops here, between blocks and micro-batches
            block = build_block(self.teacher, index, self.device, self.dtype)
            for ride in riders:
                ride(index, block)
            del block  # released before the next block is read


class TeacherCursor:
    """The teacher's residual stream over a chunked set, moved forward block by block on request, one block's
    weights in memory at a time: for walking a student's blocks beside the teacher blocks they came from.

    `block(b)` moves the stream to block b's input (restarting from the embeddings when b is behind it) and
    returns block b's module; the caller runs it on `hidden[j]` for every chunk j, puts the outputs back in
    `hidden`, and calls `done(b)`."""

    def __init__(self, teacher: StreamedTeacher, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
        self.teacher, device = teacher, teacher.device
        self.chunks = teacher.chunks(x, context)
        with torch.no_grad():
            self.parts = [teacher.shell.embed(x[c].to(device), t[c].to(device), context[c].to(device))
                          for c in self.chunks]
        self.hidden = [p.tokens for p in self.parts]
        self.at = 0  # the teacher block whose input `hidden` holds

    @torch.no_grad()
    def block(self, b: int) -> nn.Module:
        if b < self.at:
            self.hidden, self.at = [p.tokens for p in self.parts], 0
        for skipped in range(self.at, b):
            checkpoint()
            module = build_block(self.teacher.teacher, skipped, self.teacher.device, self.teacher.dtype)
            self.hidden = [step(module, h, p) for h, p in zip(self.hidden, self.parts)]
        self.at = b
        checkpoint()
        return build_block(self.teacher.teacher, b, self.teacher.device, self.teacher.dtype)

    def done(self, b: int) -> None:
        self.at = b + 1


def step(block: nn.Module, hidden: torch.Tensor, p) -> torch.Tensor:
    """One block on one micro-batch, after a stop check."""
    checkpoint()
    return block(hidden, p.e0, p.ctx, p.freqs)


def predict(model: nn.Module | StreamedTeacher, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
            batch: int = 256) -> torch.Tensor:
    """The model's velocity for a whole set: a streamed teacher in one pass, a module in batches (float32, CPU) of
    at most `batch` latents, fewer where a WanLite's working set would pass budget.MICRO_BATCH_BYTES."""
    if getattr(model, "streams", False):
        return model(x, t, context)
    device = next(model.parameters()).device
    sizes = budget.module_config(model)
    if sizes is not None and x.dim() == 4 and context.dim() == 3:
        batch = budget.micro_batch(sizes, budget.tokens_per_latent(*x.shape[-2:]), context.shape[1], batch)
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            checkpoint()
            out.append(model(x[i:i + batch].to(device), t[i:i + batch].to(device),
                             context[i:i + batch].to(device)).float().cpu())
    return torch.cat(out)
