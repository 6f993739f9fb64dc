"""Projectors: output projectors see standardised signal states (what differs between prompts, not the shared
constant); the grid input projector keeps where things are in the image."""

from __future__ import annotations

import pytest
import torch

from anyverse.config import InputProjectorConfig, OutputProjectorConfig
from anyverse.projectors import GridProjector, OutputProjector, build_input_projector


def projector() -> OutputProjector:
    cfg = OutputProjectorConfig(d_model=16, encoder_layers=1, decoder_layers=1, heads=2, feedforward=32)
    return OutputProjector(8, 3, {"prompt_embeds": (5, 4)}, cfg)


def test_standardize_takes_the_statistics_of_training_states_and_floors_flat_features() -> None:
    torch.manual_seed(0)
    states = 10 + 0.05 * torch.randn(64, 3, 8)  # large shared part, small differences, as LLM states are
    states[:, :, 0] = 3.0  # a feature that never varies
    proj = projector()
    proj.standardize(states)
    seen: list[torch.Tensor] = []
    proj.inp.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    proj(states)
    inputs = seen[0]
    torch.testing.assert_close(inputs[..., 1:].mean(0), torch.zeros(3, 7), atol=1e-4, rtol=0)
    torch.testing.assert_close(inputs[..., 1:].std(0, unbiased=False), torch.ones(3, 7), atol=1e-4, rtol=0)
    assert inputs[..., 0].abs().max() < 1e-3  # floored, not divided by ~0


def test_a_fresh_projector_passes_states_unchanged_and_keeps_its_statistics_in_its_weights() -> None:
    proj = projector()
    assert set(proj.state_dict()) >= {"state_mean", "state_std"}
    states = torch.randn(2, 3, 8)
    seen: list[torch.Tensor] = []
    proj.inp.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    proj(states)
    torch.testing.assert_close(seen[0], states)


def vision_tokens(cells: dict[tuple[int, int], float], side: int = 4) -> torch.Tensor:
    """[1, 1 + side^2, 6] ImageBind-like tokens (CLS first): zeros, except the given patches set to a value."""
    tokens = torch.zeros(1, 1 + side * side, 6)
    for (row, col), value in cells.items():
        tokens[0, 1 + row * side + col] = value * torch.arange(1.0, 7.0)
    return tokens


def test_grid_projector_sees_where_content_is_but_not_its_order_within_a_cell() -> None:
    torch.manual_seed(0)
    proj = build_input_projector(InputProjectorConfig(kind="grid", num_tokens=3, grid=2), 5, 6, 8)
    assert isinstance(proj, GridProjector)
    top_left = proj(torch.zeros(1, 5), vision_tokens({(0, 0): 1.0}))
    assert top_left.shape == (1, 3, 8)
    same_cell = proj(torch.zeros(1, 5), vision_tokens({(1, 1): 1.0}))  # another patch of the top-left 2x2 cell
    bottom_right = proj(torch.zeros(1, 5), vision_tokens({(3, 3): 1.0}))
    torch.testing.assert_close(top_left, same_cell)
    assert (top_left - bottom_right).abs().max() > 1e-3


def test_grid_projector_refuses_tokens_that_are_not_a_square_grid() -> None:
    proj = build_input_projector(InputProjectorConfig(kind="grid", num_tokens=2, grid=2), 5, 6, 8)
    with pytest.raises(ValueError, match="12 patch tokens do not form a square grid"):
        proj(torch.zeros(1, 5), torch.zeros(1, 13, 6))  # e.g. audio's 12-patch spectrogram layout
