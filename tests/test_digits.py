"""The demo data: digits -> latents -> digits exactly, the seeded split, the stand-in prompt states."""
from __future__ import annotations

import pytest
import torch

from projection import ProjectionError
from projection.demo import digits


@pytest.fixture(scope="module")
def data() -> digits.Digits:
    return digits.load_digits()


def test_latents_decode_back_to_the_exact_pixels(data):
    latents = digits.encode(data.images)
    assert latents.shape == (1797, 4, 8, 8) and latents.dtype == torch.float32
    back = digits.decode(latents)
    assert (back - data.images).abs().max() < 1e-5
    assert torch.equal((back * digits.LEVELS).round(), data.images * digits.LEVELS)  # every grey level, exactly


def test_latents_are_normalized_per_channel_and_use_all_four(data):
    latents = digits.encode(data.images)
    assert latents.mean(dim=(0, 2, 3)).abs().max() < 0.01
    assert (latents.std(dim=(0, 2, 3)) - 1).abs().max() < 0.01
    # Every channel carries the image: each one, decorrelated from the others, predicts it.
    flat = latents.permute(1, 0, 2, 3).reshape(4, -1)
    assert torch.linalg.matrix_rank(torch.cov(flat)) == 4


def test_decoding_reads_every_latent_channel(data):
    """A student that gets a channel wrong draws a different picture: no channel is ignored by the decoder."""
    latents = digits.encode(data.images[:5])
    for c in range(digits.CHANNELS):
        bumped = latents.clone()
        bumped[:, c] += 0.5
        assert (digits.decode(bumped) - data.images[:5]).abs().max() > 0.01


def test_decoding_is_the_least_squares_inverse():
    """For a latent no image encodes to, the decoded image's latent is the nearest one: the residual is
    orthogonal to every encoded image's latent direction."""
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    x = digits.decode(z)
    offset = digits.encode(torch.zeros(1, 8, 8))
    residual = (z - digits.encode(x)).reshape(3, -1).double()
    directions = (digits.encode(torch.eye(64).reshape(64, 8, 8)) - offset).reshape(64, -1).double()
    assert (residual @ directions.T).abs().max() < 1e-3 * residual.norm()


def test_decode_refuses_other_shapes():
    with pytest.raises(ProjectionError, match=r"\[N, 4, 8, 8\], got \[2, 16, 8, 8\]"):
        digits.decode(torch.zeros(2, 16, 8, 8))


def test_split_is_seeded_stratified_and_disjoint(data):
    train, val = digits.split_indices(data.labels)
    again = digits.split_indices(data.labels)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert len(set(train.tolist()) & set(val.tolist())) == 0 and len(train) + len(val) == len(data.labels)
    per_class = data.labels.bincount()
    val_per_class = data.labels[val].bincount(minlength=10)
    assert torch.equal(val_per_class, (per_class * digits.VAL_FRACTION).round().long())
    other = digits.split_indices(data.labels, seed=1)[1]
    assert not torch.equal(val, other)
    held = digits.load_digits("val")
    assert torch.equal(held.images, data.images[val]) and torch.equal(held.labels, data.labels[val])
    with pytest.raises(ProjectionError, match="split 'test'"):
        digits.load_digits("test")  # type: ignore[arg-type]


def test_prompt_states_are_word_plus_position_zero_padded():
    context, lengths = digits.prompt_states(["a handwritten digit 3", "a handwritten digit 7", ""])
    assert context.shape == (3, digits.CONTEXT_LEN, digits.TEXT_DIM)
    assert lengths.tolist() == [4, 4, 0]
    assert torch.equal(context[0, :3], context[1, :3])  # the shared words, at the same positions
    assert not torch.allclose(context[0, 3], context[1, 3])  # the digit differs
    assert torch.count_nonzero(context[:2, 4:]) == 0 and torch.count_nonzero(context[2]) == 0
    assert torch.equal(digits.empty_states(2), context[2:].expand(2, -1, -1))
    assert torch.equal(digits.label_states([3, 7]), context[:2])
    moved, _ = digits.prompt_states(["digit 3"])  # the same word elsewhere has other states (position)
    assert not torch.allclose(moved[0, 1], context[0, 3])


def test_prompts_with_unknown_or_too_many_words_are_refused():
    with pytest.raises(ProjectionError, match="unknown word 'cat'"):
        digits.prompt_states(["a handwritten cat"])
    with pytest.raises(ProjectionError, match="9 words; at most 8"):
        digits.prompt_states(["a " * 9])
