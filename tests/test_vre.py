"""VRE: architecture against the released key list, vectorised token selection against the loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.baseline import select_codes_loop, tokens_from_codes
from model.config import VREConfig
from model.networks.vre import VisualRepresentationEmbedder, nearest_codes, select_token_indices

KEYS_TSV = Path(__file__).resolve().parents[2] / "shared/reference/vre_checkpoint_keys.tsv"


def select_tokens_loop(z: torch.Tensor, codebook: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The authors' loop for one image's (N, C) features: (num_tokens, C), zero rows after."""
    return tokens_from_codes(select_codes_loop(z, codebook, num_tokens), codebook, num_tokens)


def _vectorised(z: torch.Tensor, codebook: torch.Tensor, num_tokens: int) -> torch.Tensor:
    distance, index = nearest_codes(z, codebook)
    codes, valid = select_token_indices(distance, index, codebook.shape[0], num_tokens)
    return codebook[codes] * valid.unsqueeze(-1)


@pytest.mark.parametrize(("n", "k", "c"), [(256, 1024, 32), (256, 50, 8), (64, 128, 16)])
def test_selection_equals_authors_loop(n: int, k: int, c: int) -> None:
    g = torch.Generator().manual_seed(n + k)
    z, codebook = torch.randn(4, n, c, generator=g), torch.randn(k, c, generator=g)
    ours = _vectorised(z, codebook, 77)
    for b in range(4):
        torch.testing.assert_close(ours[b], select_tokens_loop(z[b], codebook, 77), atol=0, rtol=0)


def test_fewer_distinct_codes_than_tokens_pads_with_zeros() -> None:
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(10, 8, generator=g)
    z = codebook[torch.randint(0, 5, (2, 256), generator=g)] + 0.01  # only 5 codes are nearest
    ours = _vectorised(z, codebook, 77)
    assert (ours[:, 5:] == 0).all() and (ours[:, :5].abs().sum(-1) > 0).all()
    for b in range(2):
        torch.testing.assert_close(ours[b], select_tokens_loop(z[b], codebook, 77), atol=0, rtol=0)


def test_ties_follow_position_order() -> None:
    codebook = torch.eye(4) * 2
    # positions 0..3 all at the same distance from different codes: walk in position order
    z = torch.stack([codebook[3], codebook[1], codebook[2], codebook[0]]).unsqueeze(0)
    distance, index = nearest_codes(z, codebook)
    codes, valid = select_token_indices(distance, index, 4, 3)
    assert codes.tolist() == [[3, 1, 2]] and valid.all()
    torch.testing.assert_close(codebook[codes[0]], select_tokens_loop(z[0], codebook, 3))


def test_distances_stay_float32_in_half_precision() -> None:
    g = torch.Generator().manual_seed(1)
    z, codebook = torch.randn(1, 256, 64, generator=g), torch.randn(512, 64, generator=g)
    _, i32 = nearest_codes(z, codebook)
    d16, i16 = nearest_codes(z.half(), codebook.half())
    assert d16.dtype == torch.float32
    assert (i32 == i16).float().mean() > 0.95


def test_released_architecture_matches_checkpoint_key_list() -> None:
    if not KEYS_TSV.is_file():
        pytest.skip(f"{KEYS_TSV} absent")
    with torch.device("meta"):
        vre = VisualRepresentationEmbedder(VREConfig())
    ours = {
        k: tuple(v.shape) for k, v in vre.state_dict().items() if not k.startswith("projection.")
    }
    released = {}
    for line in KEYS_TSV.read_text().splitlines():
        key, shape = line.split("\t")
        released[key.removeprefix("vqvae_LQ.")] = tuple(
            int(s) for s in shape.strip("()").split(",") if s.strip()
        )
    assert ours == released
    assert len(released) == 173


def test_full_size_parameter_counts() -> None:
    with torch.device("meta"):
        vre = VisualRepresentationEmbedder(VREConfig())
    tokenizer = sum(p.numel() for n, p in vre.named_parameters() if not n.startswith("projection."))
    projection = sum(p.numel() for p in vre.projection.parameters())
    assert tokenizer / 1e6 == pytest.approx(29.17, abs=0.01)
    assert projection / 1e6 == pytest.approx(0.39, abs=0.01)


def test_prompt_shape_and_projection_silu(tiny_restorer) -> None:
    vre = tiny_restorer.vre
    cfg = vre.config
    prompt = vre(torch.rand(2, 3, 512, 512) * 2 - 1)
    assert prompt.shape == (2, cfg.num_tokens, cfg.prompt_dim)
    assert (prompt >= -0.2785).all(), "the final SiLU bounds outputs below by min(silu) = -0.2785"
