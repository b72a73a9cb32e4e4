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
