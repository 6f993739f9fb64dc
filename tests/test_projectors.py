"""Projectors: output projectors see standardised signal states (what differs between prompts, not the shared
constant); the grid input projector keeps where things are in the image."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anyverse.config import InputProjectorConfig, OutputProjectorConfig
from anyverse.projectors import GridProjector, OutputProjector, WordMixture, build_input_projector


def projector(linear_rank: int = 0) -> OutputProjector:
    cfg = OutputProjectorConfig(d_model=16, encoder_layers=1, decoder_layers=1, heads=2, feedforward=32,
                                linear_rank=linear_rank)
    return OutputProjector(8, 3, {"prompt_embeds": (5, 4), "pooled": (1, 2)}, cfg)


def targets(n: int) -> dict[str, torch.Tensor]:
    return {"prompt_embeds": 4 + 0.1 * torch.randn(n, 5, 4), "pooled": -2 + 0.1 * torch.randn(n, 1, 2)}


def test_standardize_takes_the_statistics_of_training_states_and_floors_flat_features() -> None:
    torch.manual_seed(0)
    states = 10 + 0.05 * torch.randn(64, 3, 8)  # large shared part, small differences, as LLM states are
    states[:, :, 0] = 3.0  # a feature that never varies
    proj = projector()
    proj.standardize(states, targets(64))
    seen: list[torch.Tensor] = []
    proj.body.inp.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    proj(states)
    inputs = seen[0]
    torch.testing.assert_close(inputs[..., 1:].mean(0), torch.zeros(3, 7), atol=1e-4, rtol=0)
    torch.testing.assert_close(inputs[..., 1:].std(0, unbiased=False), torch.ones(3, 7), atol=1e-4, rtol=0)
    assert inputs[..., 0].abs().max() < 1e-3  # floored, not divided by ~0


@pytest.mark.parametrize("linear_rank", [0, 6])
def test_projectors_predict_standardised_targets_one_tensor_per_declared_conditioning(linear_rank: int) -> None:
    torch.manual_seed(0)
    proj, wanted = projector(linear_rank), targets(64)
    proj.standardize(torch.randn(64, 3, 8), wanted)
    out = proj(torch.randn(2, 3, 8))
    shapes = {name: tuple(value.shape) for name, value in out.items()}
    assert shapes == {"prompt_embeds": (2, 5, 4), "pooled": (2, 1, 2)}
    with torch.no_grad():  # a projector whose layers output zeros predicts the training targets' mean
        for parameter in proj.parameters():
            parameter.zero_()
    out = proj(torch.randn(2, 3, 8))
    for name, value in wanted.items():
        torch.testing.assert_close(out[name], value.mean(0).expand(2, -1, -1))


def test_the_linear_path_adds_a_low_rank_map_of_all_signal_states() -> None:
    torch.manual_seed(0)
    proj = projector(linear_rank=6)
    assert proj.linear is not None and proj.linear.down.weight.shape == (6, 3 * 8)
    states = torch.randn(2, 3, 8)
    with_linear = proj(states)
    proj.linear = None
    without = proj(states)
    assert all((with_linear[name] - without[name]).abs().max() > 1e-4 for name in without)


def test_a_fresh_projector_passes_states_unchanged_and_keeps_its_statistics_in_its_weights() -> None:
    proj = projector()
    assert set(proj.state_dict()) >= {"state_mean", "state_std", "target_mean", "target_std"}
    states = torch.randn(2, 3, 8)
    seen: list[torch.Tensor] = []
    proj.body.inp.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    proj(states)
    torch.testing.assert_close(seen[0], states)


WORDS = nn.Embedding(10, 8)  # an LLM's input embeddings: 10 words of width 8


def vision_tokens(cells: dict[tuple[int, int], float], side: int = 4) -> torch.Tensor:
    """[1, 1 + side^2, 6] ImageBind-like tokens (CLS first): zeros, except the given patches set to a value."""
    tokens = torch.zeros(1, 1 + side * side, 6)
    for (row, col), value in cells.items():
        tokens[0, 1 + row * side + col] = value * torch.arange(1.0, 7.0)
    return tokens


def test_grid_projector_sees_where_content_is_but_not_its_order_within_a_cell() -> None:
    torch.manual_seed(0)
    proj = build_input_projector(InputProjectorConfig(kind="grid", num_tokens=3, grid=2), 5, 6, 8, (1, 4, 4), WORDS)
    assert isinstance(proj, GridProjector)
    top_left = proj(torch.zeros(1, 5), vision_tokens({(0, 0): 1.0}))
    assert top_left.shape == (1, 3, 8)
    same_cell = proj(torch.zeros(1, 5), vision_tokens({(1, 1): 1.0}))  # another patch of the top-left 2x2 cell
    bottom_right = proj(torch.zeros(1, 5), vision_tokens({(3, 3): 1.0}))
    torch.testing.assert_close(top_left, same_cell)
    assert (top_left - bottom_right).abs().max() > 1e-3


def test_grid_projector_reads_a_clips_frames_apart() -> None:
    """With a one-frame patch kernel a clip's two frames are patched apart: a thing moving right, from the left cell to
    the right one, must project differently from one moving left, which the same cells averaged over time hide."""
    torch.manual_seed(0)
    proj = build_input_projector(InputProjectorConfig(kind="grid", num_tokens=3, grid=2), 5, 6, 8, (2, 4, 4), WORDS)
    left, right = vision_tokens({(0, 0): 1.0})[:, 1:], vision_tokens({(0, 3): 1.0})[:, 1:]
    cls = torch.zeros(1, 1, 6)
    moving_right = proj(torch.zeros(1, 5), torch.cat([cls, left, right], dim=1))
    moving_left = proj(torch.zeros(1, 5), torch.cat([cls, right, left], dim=1))
    assert moving_right.shape == (1, 3, 8)
    assert (moving_right - moving_left).abs().max() > 1e-3
    with pytest.raises(ValueError, match="16 patch tokens do not form the encoder's 2x4x4 patch grid"):
        proj(torch.zeros(1, 5), vision_tokens({}))


def test_grid_projector_reads_the_pooled_embedding_too() -> None:
    """Shape lives in the toy towers' pooled embedding, not in averaged cells: the same cells with another pooled
    embedding must project differently."""
    torch.manual_seed(0)
    proj = build_input_projector(InputProjectorConfig(kind="grid", num_tokens=3, grid=2), 5, 6, 8, (1, 4, 4), WORDS)
    tokens = vision_tokens({(0, 0): 1.0})
    pooled = torch.randn(2, 5)
    out = proj(pooled, tokens.expand(2, -1, -1))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_a_grey_view_readout_starts_at_zero_and_learns_only_from_items_shown_by_their_grey_view_alone() -> None:
    """Two views (the encoder's grey_view): pooled and tokens hold the colour view, then the grey one. The grey
    readout adds nothing at first; a loss on an item with both views trains only the colour readout, a loss on a
    grey twin (colour view zeroed) trains the grey readout."""
    torch.manual_seed(0)
    cfg = InputProjectorConfig(kind="grid", num_tokens=3, grid=2, hidden_dim=0)
    proj = build_input_projector(cfg, 5, 6, 8, (1, 4, 4), WORDS, views=2)
    colour, grey = vision_tokens({(0, 0): 1.0}), vision_tokens({(3, 3): 2.0})
    pooled, tokens = torch.randn(1, 10), torch.cat([colour, grey], dim=1)
    assert isinstance(proj, GridProjector) and proj.grey is not None
    assert torch.equal(proj(pooled, tokens), proj.read(pooled[:, :5], colour))
    proj(pooled, tokens).sum().backward()
    assert proj.grey.mlp.weight.grad is None or not proj.grey.mlp.weight.grad.any()
    assert proj.mlp.weight.grad is not None and proj.mlp.weight.grad.any()
    proj.zero_grad()
    twin_pooled = torch.cat([torch.zeros(1, 5), pooled[:, 5:]], dim=1)
    proj(twin_pooled, torch.cat([torch.zeros_like(colour), grey], dim=1)).sum().backward()
    assert proj.grey.mlp.weight.grad is not None and proj.grey.mlp.weight.grad.any()


def test_a_words_projector_writes_each_soft_token_as_a_mixture_of_the_llms_own_embeddings() -> None:
    torch.manual_seed(0)
    cfg = InputProjectorConfig(kind="grid", num_tokens=3, grid=2, hidden_dim=0, words=True)
    proj = build_input_projector(cfg, 5, 6, 8, (1, 4, 4), WORDS)
    assert isinstance(proj, WordMixture) and isinstance(proj.projector.mlp, nn.Linear)  # hidden_dim 0: linear
    pooled, tokens = torch.randn(2, 5), vision_tokens({(0, 0): 1.0}).expand(2, -1, -1)
    logits = proj.logits(pooled, tokens)
    assert logits.shape == (2, 3, 10)
    torch.testing.assert_close(proj(pooled, tokens), logits.softmax(dim=-1) @ WORDS.weight)
    # the LLM's embeddings stay the LLM's: not trained through the projector, not saved with it
    assert all(parameter is not WORDS.weight for parameter in proj.parameters())
    assert set(proj.state_dict()) == {"projector.norm.weight", "projector.norm.bias", "projector.pooled_norm.weight",
                                      "projector.pooled_norm.bias", "projector.mlp.weight", "projector.mlp.bias"}


def test_a_hard_words_projector_writes_each_top_word_as_the_llm_reads_it_and_trains_through_the_mixture() -> None:
    torch.manual_seed(0)
    cfg = InputProjectorConfig(kind="grid", num_tokens=3, grid=2, hidden_dim=0, words=True, hard_words=True)
    proj = build_input_projector(cfg, 5, 6, 8, (1, 4, 4), WORDS)
    pooled, tokens = torch.randn(2, 5), vision_tokens({(0, 0): 1.0}).expand(2, -1, -1)
    logits = proj.logits(pooled, tokens)
    out = proj(pooled, tokens)
    torch.testing.assert_close(out, WORDS(logits.argmax(dim=-1)))  # exactly the words, as text embeds them
    (out * torch.randn_like(out)).sum().backward()
    assert proj.projector.mlp.weight.grad is not None and proj.projector.mlp.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="hard_words: true is for projectors that write words"):
        InputProjectorConfig(kind="grid", hard_words=True)


def test_grid_projector_folds_a_rectangular_patch_grid_and_refuses_another_layout() -> None:
    """Audio's patches are frequency rows x time columns: a sound's pitch is the row its energy is in."""
    torch.manual_seed(0)
    proj = build_input_projector(InputProjectorConfig(kind="grid", num_tokens=2, grid=2), 5, 6, 8, (1, 2, 6), WORDS)
    low, high = torch.zeros(1, 13, 6), torch.zeros(1, 13, 6)
    low[0, 1 + 6 * 1 + 2], high[0, 1 + 2] = torch.arange(1.0, 7.0), torch.arange(1.0, 7.0)  # same time, other row
    assert (proj(torch.zeros(1, 5), low) - proj(torch.zeros(1, 5), high)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="16 patch tokens do not form the encoder's 1x2x6 patch grid"):
        proj(torch.zeros(1, 5), torch.zeros(1, 17, 6))


def test_a_linear_readout_is_for_grid_projectors_only() -> None:
    with pytest.raises(ValueError, match="hidden_dim: 0 \\(a linear readout\\) is for grid projectors"):
        InputProjectorConfig(kind="mlp", hidden_dim=0)
