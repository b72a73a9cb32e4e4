"""The one normalisation of images: [0, 1] <-> [-1, 1]."""

from __future__ import annotations

import torch

from model.image_processor import denormalize, normalize


def test_round_trip_and_range() -> None:
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    lq = normalize(x)
    assert lq.min() >= -1 and lq.max() <= 1
    torch.testing.assert_close(denormalize(lq), x, atol=1e-7, rtol=0)
    assert normalize(torch.tensor([0.0, 0.5, 1.0])).tolist() == [-1.0, 0.0, 1.0]


def test_denormalize_clamps_unless_asked_not_to() -> None:
    out = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5], requires_grad=True)
    assert denormalize(out).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    loose = denormalize(out, clamp=False)
    assert loose.tolist() == [-1.0, 0.0, 0.5, 1.0, 1.75]
    loose.sum().backward()  # gradients reach values outside the range, for the losses
    assert out.grad.tolist() == [0.5] * 5


def test_pixels_round_trip_exactly_and_keep_the_layout() -> None:
    import numpy as np

    from model.image_processor import pixels_to_tensor, tensor_to_pixels

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)  # (N, H, W, 3)
    tensor = pixels_to_tensor(list(pixels))
    assert tensor.shape == (2, 3, 5, 7) and tensor.dtype == torch.float32
    assert tensor.is_contiguous() and tensor.min() >= 0.0 and tensor.max() <= 1.0
    assert float(tensor[1, 2, 4, 6]) == np.float32(pixels[1, 4, 6, 2]) / np.float32(255)  # RGB last
    assert np.array_equal(pixels_to_tensor(pixels), tensor)  # one array = a list of them
    back = tensor_to_pixels(tensor)
    assert back.dtype == np.uint8 and np.array_equal(back, pixels)
    assert np.array_equal(tensor_to_pixels((tensor * 255).round().byte()), pixels)  # uint8 as it is
    out_of_range = torch.tensor([-0.5, 0.5, 1.5]).reshape(1, 3, 1, 1)
    assert tensor_to_pixels(out_of_range).tolist() == [[[[0, 128, 255]]]]
