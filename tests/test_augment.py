"""at.data.augment: batched reflect-pad/crop/flip against a per-image numpy reference, and normalize."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from at.data.augment import (
    CIFAR_MEAN,
    CIFAR_STD,
    apply_crop_flip,
    draw_crop_flip,
    normalize,
    random_crop_flip,
)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clone(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def _reference(x: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int) -> np.ndarray:
    """One image at a time: numpy reflect padding, a slice at the drawn corner, then a mirror."""
    out = np.empty_like(x)
    height, width = x.shape[2:]
    for i in range(len(x)):
        padded = np.pad(x[i], ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
        dy, dx = offsets[i]
        crop = padded[:, dy : dy + height, dx : dx + width]
        out[i] = crop[:, :, ::-1] if flips[i] else crop
    return out


def _batch(shape=(16, 3, 8, 12), seed=0) -> torch.Tensor:
    # Not square, so that a swapped row/column index cannot go unnoticed.
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=_generator(seed))


@pytest.mark.parametrize("pad", [1, 3, 4])
@pytest.mark.parametrize("crop,flip", [(True, True), (True, False), (False, True)])
def test_matches_per_image_reference(pad, crop, flip):
    x = _batch()
    g = _generator(123)
    drawn = draw_crop_flip(len(x), _clone(g), pad, crop, flip)
    out = random_crop_flip(x, g, pad=pad, crop=crop, flip=flip)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    expected = _reference(x.numpy(), drawn.offsets.numpy(), drawn.flips.numpy(), pad)
    assert np.array_equal(out.numpy(), expected)
    # The generator advanced exactly as the exposed draw did.
    assert torch.equal(g.get_state(), _clone_after(123, len(x), pad, crop, flip).get_state())


def _clone_after(seed, batch, pad, crop, flip):
    g = _generator(seed)
    draw_crop_flip(batch, g, pad, crop, flip)
    return g


def test_crop_only_never_flips_and_flip_only_never_shifts():
    x = _batch()
    crop_only = draw_crop_flip(len(x), _generator(1), pad=4, crop=True, flip=False)
    assert not crop_only.flips.any()
    out = random_crop_flip(x, _generator(2), pad=4, crop=False, flip=True)
    for i in range(len(x)):
        # Every image is either untouched or exactly mirrored.
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    flipped = [not torch.equal(out[i], x[i]) for i in range(len(x))]
    assert 0 < sum(flipped) < len(x)


def test_pad_zero_without_flip_is_identity():
    x = _batch()
    assert torch.equal(random_crop_flip(x, _generator(0), pad=0, flip=False), x)
    assert torch.equal(random_crop_flip(x, _generator(0), pad=4, crop=False, flip=False), x)


def test_hand_worked_case():
    # One 1x3x3 image, pad 1. Reflect-padded it reads (rows):
    #   4 3 4 5 4 / 1 0 1 2 1 / 4 3 4 5 4 / 7 6 7 8 7 / 4 3 4 5 4
    x = torch.arange(9, dtype=torch.uint8).view(1, 1, 3, 3)
    params = draw_crop_flip(1, _generator(0), pad=1)
    shifted = type(params)(torch.tensor([[0, 2]]), torch.tensor([False]))
    assert apply_crop_flip(x, shifted, pad=1)[0, 0].tolist() == [[4, 5, 4], [1, 2, 1], [4, 5, 4]]
    mirrored = type(params)(torch.tensor([[2, 1]]), torch.tensor([True]))
    assert apply_crop_flip(x, mirrored, pad=1)[0, 0].tolist() == [[5, 4, 3], [8, 7, 6], [5, 4, 3]]


def test_channels_last_input():
    x = _batch((8, 3, 32, 32))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out = random_crop_flip(x, _generator(5))
    out_cl = random_crop_flip(x_cl, _generator(5))
    assert torch.equal(out, out_cl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    params = draw_crop_flip(len(x), _generator(5))
    expected = _reference(x.numpy(), params.offsets.numpy(), params.flips.numpy(), 4)
    assert np.array_equal(out_cl.numpy(), expected)


def test_statistics_on_a_large_batch():
    n, pad = 40_000, 4
    params = draw_crop_flip(n, _generator(7), pad=pad)
    flip_rate = params.flips.float().mean().item()
    assert abs(flip_rate - 0.5) < 0.0125  # 5 standard deviations
    for axis in range(2):
        counts = torch.bincount(params.offsets[:, axis], minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1  # nothing outside 0..2*pad
        expected = n / (2 * pad + 1)
        sd = (n * (1 / 9) * (8 / 9)) ** 0.5
        assert ((counts - expected).abs() < 5 * sd).all(), counts
    # Rows and columns are drawn independently of each other and of the flip.
    joint = torch.bincount(params.offsets[:, 0] * 9 + params.offsets[:, 1], minlength=81)
    assert (joint > 0).all()
    draws = torch.stack([params.offsets[:, 0], params.offsets[:, 1], params.flips.long()]).float()
    corr = torch.corrcoef(draws)
    assert (corr - torch.eye(3)).abs().max() < 0.03


def test_image_values_follow_the_draw_on_a_large_batch():
    # A batch of identical images tells the draw back from the output: the column index of a
    # marked pixel moves with the offset and mirrors with the flip.
    n = 4096
    x = torch.zeros(n, 1, 32, 32, dtype=torch.uint8)
    x[:, :, 16, 16] = 255
    out = random_crop_flip(x, _generator(3))
    params = draw_crop_flip(n, _generator(3))
    rows, cols = (out[:, 0] == 255).nonzero()[:, 1:].T
    assert len(rows) == n  # the marked pixel stays inside the crop for every image
    assert torch.equal(rows, 16 + 4 - params.offsets[:, 0])
    col = 16 + 4 - params.offsets[:, 1]
    assert torch.equal(cols, torch.where(params.flips, 31 - col, col))


def test_determinism_and_resume_from_generator_state():
    x = _batch()
    g1, g2 = _generator(11), _generator(11)
    first = [random_crop_flip(x, g1) for _ in range(3)]
    assert all(torch.equal(a, random_crop_flip(x, g2)) for a in first)
    # Save the state mid-run (as a checkpoint does), then continue from it elsewhere.
    state = g1.get_state()
    after = [random_crop_flip(x, g1) for _ in range(2)]
    resumed = torch.Generator()
    resumed.set_state(state)
    assert all(torch.equal(a, random_crop_flip(x, resumed)) for a in after)
    assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize(
    "x,pad,message",
    [
        (torch.zeros(2, 3, 8, 8), 4, "uint8"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), 4, "shape"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 8, "pad < image size"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), -1, ">= 0"),
    ],
)
def test_bad_input_is_refused(x, pad, message):
    g = _generator(0)
    state = g.get_state()
    with pytest.raises(ValueError, match=message):
        random_crop_flip(x, g, pad=pad)
    assert torch.equal(g.get_state(), state)  # a refused call draws nothing


def test_normalize_against_float64_formula():
    x = _batch((4, 3, 5, 6))
    out = normalize(x, CIFAR_MEAN, CIFAR_STD)
    assert out.dtype == torch.float32
    mean = np.array([125.3, 123.0, 113.9]).reshape(3, 1, 1)
    std = np.array([63.0, 62.1, 66.7]).reshape(3, 1, 1)
    expected = (x.numpy().astype(np.float64) - mean) / std
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)


def test_normalize_keeps_channels_last_and_checks_channels():
    x = _batch((2, 3, 4, 4)).contiguous(memory_format=torch.channels_last)
    out = normalize(x, CIFAR_MEAN, CIFAR_STD)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, normalize(x.contiguous(), CIFAR_MEAN, CIFAR_STD))
    with pytest.raises(ValueError, match="3"):
        normalize(x, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="uint8"):
        normalize(x.float(), CIFAR_MEAN, CIFAR_STD)


def test_cifar_constants():
    assert CIFAR_MEAN == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    assert CIFAR_STD == pytest.approx((63.0 / 255, 62.1 / 255, 66.7 / 255))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
def test_cuda_batch_matches_the_reference(generator_device):
    x = _batch((64, 3, 32, 32))
    g = torch.Generator(device=generator_device).manual_seed(9)
    params = draw_crop_flip(len(x), _clone(g), pad=4)
    x_cuda = x.cuda().contiguous(memory_format=torch.channels_last)
    out = random_crop_flip(x_cuda, g)
    assert out.is_cuda and out.is_contiguous(memory_format=torch.channels_last)
    expected = _reference(x.numpy(), params.offsets.cpu().numpy(), params.flips.cpu().numpy(), 4)
    assert np.array_equal(out.cpu().numpy(), expected)
    normalized = normalize(x_cuda)
    assert normalized.is_cuda and torch.allclose(normalized.cpu(), normalize(x), atol=1e-6)
