"""The demo teacher's data: scikit-learn's handwritten digits as 4-channel latents, with prompts.

Images: `sklearn.datasets.load_digits` (1,797 real 8x8 scans, 17 grey levels 0..16, bundled with scikit-learn),
scaled to [0, 1]. scikit-learn is needed only to load them (training, tests); the app never does.

Latents [4, 8, 8]: a fixed, invertible, affine transform of the image x, in the role of Wan's VAE:
  planes  = [x, x - x shifted right, x - x shifted down, 3x3 box mean of x]    (zero padding at the borders)
  mixed   = H @ planes per pixel, H = the 4x4 Hadamard matrix / 2 (orthogonal; exact in binary floats)
  latent  = (mixed - LATENT_MEAN) / LATENT_STD per channel, so the model sees about zero mean and unit variance
            (as Wan's latents are normalized)
Decoding is the least-squares inverse of this affine map: exact on every encoded image, and for a generated
latent it is the image whose latent is nearest.

Prompts: "a handwritten digit 3". Their "text encoder states" stand in for UMT5's: each word has a fixed,
seeded vector of TEXT_DIM values and each position one too; a prompt's states are word + position per token,
zero-padded to CONTEXT_LEN tokens (Wan zero-pads UMT5 states to 512). The empty prompt (classifier-free
guidance's negative) is all zeros.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import ProjectionError

SIZE = 8  # image and latent height and width
CHANNELS = 4  # latent channels
LEVELS = 16  # grey levels are 0..16
NUM_CLASSES = 10
CONTEXT_LEN = 8  # tokens per prompt after zero padding
TEXT_DIM = 64  # width of the stand-in text encoder states
VAL_FRACTION = 0.15  # held out per class
SPLIT_SEED = 0
TEXT_SEED = 1234
WORDS = ("a", "handwritten", "digit", *(str(d) for d in range(NUM_CLASSES)))

# Hadamard / 2: orthogonal, symmetric, its own inverse.
MIX = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64) / 2
# Per-channel statistics of the mixed planes over all 1,797 images (computed once, then fixed).
LATENT_MEAN = torch.tensor([0.3123, 0.0310, -0.0062, 0.2734], dtype=torch.float64)
LATENT_STD = torch.tensor([0.4980, 0.2260, 0.2546, 0.2932], dtype=torch.float64)


@dataclass(frozen=True)
class Digits:
    images: torch.Tensor  # [N, 8, 8] float32 in [0, 1]
    labels: torch.Tensor  # [N] int64, 0..9


def load_digits(split: Literal["train", "val", "all"] = "all") -> Digits:
    """The digits of one split (seeded, stratified: VAL_FRACTION of each class is held out)."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.from_numpy(data.images).float() / LEVELS
    labels = torch.from_numpy(data.target).long()
    if split == "all":
        return Digits(images, labels)
    if split not in ("train", "val"):
        raise ProjectionError(f"digits split '{split}' is unknown; choose train, val or all")
    train, val = split_indices(labels)
    idx = train if split == "train" else val
    return Digits(images[idx], labels[idx])


def split_indices(labels: torch.Tensor, val_fraction: float = VAL_FRACTION,
                  seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices, ascending: per class, a seeded permutation's first round(n * val_fraction) are val."""
    g = torch.Generator().manual_seed(seed)
    val = []
    for c in range(int(labels.max()) + 1):
        members = (labels == c).nonzero().flatten()
        order = torch.randperm(len(members), generator=g)
        val.append(members[order[: round(len(members) * val_fraction)]])
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[torch.cat(val)] = True
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()


def planes(images: torch.Tensor) -> torch.Tensor:
    """[N, 8, 8] -> [N, 4, 8, 8]: the image, its horizontal and vertical differences, its 3x3 box mean."""
    x = images[:, None]
    right = F.pad(x, (1, 0))[..., :, :-1]
    down = F.pad(x, (0, 0, 1, 0))[..., :-1, :]
    box = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)
    return torch.cat([x, x - right, x - down, box], dim=1)


@functools.cache
def _affine() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """encode(x) = A x + b and its least-squares inverse D = (A^T A)^-1 A^T, in float64 (pixels flattened)."""
    basis = torch.eye(SIZE * SIZE, dtype=torch.float64).reshape(-1, SIZE, SIZE)
    mixed = torch.einsum("oc,nchw->nohw", MIX, planes(basis))  # the linear part, one basis image at a time
    a = (mixed / LATENT_STD[:, None, None]).reshape(SIZE * SIZE, -1).T  # [256, 64]
    b = (-LATENT_MEAN / LATENT_STD)[:, None].expand(CHANNELS, SIZE * SIZE).reshape(-1)
    d = torch.linalg.solve(a.T @ a, a.T)  # A has full column rank: its first plane is the image itself
    return a, b, d


def encode(images: torch.Tensor) -> torch.Tensor:
    """Images [N, 8, 8] in [0, 1] -> latents [N, 4, 8, 8] (float32)."""
    a, b, _ = _affine()
    flat = images.reshape(len(images), -1).double()
    return (flat @ a.T + b).reshape(-1, CHANNELS, SIZE, SIZE).float()


def decode(latents: torch.Tensor) -> torch.Tensor:
    """Latents [N, 4, 8, 8] -> images [N, 8, 8] (float32, not clipped): the least-squares inverse of `encode`."""
    if latents.shape[1:] != (CHANNELS, SIZE, SIZE):
        raise ProjectionError(f"digit latents must be [N, {CHANNELS}, {SIZE}, {SIZE}], got {list(latents.shape)}")
    _, b, d = _affine()
    flat = latents.reshape(len(latents), -1).double().cpu()
    return ((flat - b) @ d.T).reshape(-1, SIZE, SIZE).float()


def prompt(label: int) -> str:
    return f"a handwritten digit {label}"


@functools.cache
def _text_table() -> tuple[torch.Tensor, torch.Tensor]:
    """(word vectors [len(WORDS), TEXT_DIM], position vectors [CONTEXT_LEN, TEXT_DIM]): seeded, on the CPU
    (torch's CPU generator gives the same numbers on every platform)."""
    g = torch.Generator().manual_seed(TEXT_SEED)
    words = torch.randn(len(WORDS), TEXT_DIM, generator=g)
    positions = 0.5 * torch.randn(CONTEXT_LEN, TEXT_DIM, generator=g)
    return words, positions


def prompt_states(prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stand-in text encoder states of each prompt: (context [N, CONTEXT_LEN, TEXT_DIM], lengths [N])."""
    words, positions = _text_table()
    context = torch.zeros(len(prompts), CONTEXT_LEN, TEXT_DIM)
    lengths = torch.zeros(len(prompts), dtype=torch.long)
    for i, text in enumerate(prompts):
        tokens = text.split()
        if len(tokens) > CONTEXT_LEN:
            raise ProjectionError(f"prompt {text!r:.80}: {len(tokens)} words; at most {CONTEXT_LEN}")
        for j, token in enumerate(tokens):
            if token not in WORDS:
                raise ProjectionError(f"prompt {text!r:.80}: unknown word {token!r:.40}; the demo's words are "
                                      f"{' '.join(WORDS)}")
            context[i, j] = words[WORDS.index(token)] + positions[j]
        lengths[i] = len(tokens)
    return context, lengths


def label_states(labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Context [N, CONTEXT_LEN, TEXT_DIM] of the prompt of each label."""
    return prompt_states([prompt(int(c)) for c in labels])[0]


def empty_states(n: int = 1) -> torch.Tensor:
    """The empty prompt's states (all zeros): the negative of classifier-free guidance."""
    return prompt_states([""] * n)[0]
