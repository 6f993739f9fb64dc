"""Output projectors see standardised signal states: what differs between prompts, not the shared constant."""

from __future__ import annotations

import torch

from anyverse.config import OutputProjectorConfig
from anyverse.projectors import OutputProjector


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
