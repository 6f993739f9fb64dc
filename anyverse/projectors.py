"""Projector builders: ImageBind features -> LLM soft tokens, and signal hidden states -> generator conditioning.

Builders, not subclasses (torchtune style): ``build_input_projector`` picks linear / mlp / resampler / grid from
config.
Every width comes from the loaded encoder, LLM or generator spec; none is a constant.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anyverse.config import InputProjectorConfig, OutputProjectorConfig

Shape = tuple[int, ...]  # a conditioning tensor's shape after the batch axis: (sequence, width), or (width,)


def _seq_width(shape: Shape) -> tuple[int, int]:
    """A 2-D conditioning (AudioLDM's CLAP vector [B, 512]) is one output token of that width."""
    return (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])


class PooledProjector(nn.Module):
    """Linear or MLP from the pooled embedding to ``k`` soft tokens (NExT-GPT used linear with k=1)."""

    def __init__(self, layers: nn.Module, num_tokens: int, llm_dim: int):
        super().__init__()
        self.layers, self.num_tokens, self.llm_dim = layers, num_tokens, llm_dim

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled).view(pooled.shape[0], self.num_tokens, self.llm_dim)


class Resampler(nn.Module):
    """Perceiver/Q-Former style: ``k`` learned queries cross-attend over the encoder's patch tokens."""

    def __init__(self, token_dim: int, llm_dim: int, cfg: InputProjectorConfig):
        super().__init__()
        width = cfg.hidden_dim or llm_dim
        self.queries = nn.Parameter(torch.randn(cfg.num_tokens, width) * 0.02)
        self.kv = nn.Linear(token_dim, width)
        layer = nn.TransformerDecoderLayer(width, cfg.heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(layer, cfg.layers)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, llm_dim))

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        queries = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.out(self.blocks(queries, self.kv(tokens)))


class GridProjector(nn.Module):
    """Locality-preserving (Honeybee's argument against resamplers): the patch tokens are average-pooled to a
    ``grid x grid`` map of cells (one per frame where a clip's frames are patched apart), and an MLP reads all cells
    at once, so each cell has its own weights and *where* something is stays readable. A CLS token or learned-query
    attention must first learn to bind content to position; the toy world's tiny towers never did (object position
    at chance from the pooled embedding and from a resampler, 1.0 from a 2x2 grid of the same frozen tokens).

    The MLP reads the pooled embedding too: what the tower learnt about the whole object lives there, where the
    cells tell where it is. ``hidden_dim: 0`` reads them linearly, which composes better where each soft token is
    trained to be one word (:class:`WordMixture`).

    With ``views=2`` (the encoder's ``grey_view``) a second readout of the same kind reads the grey view and adds
    to the first. It starts at zero and learns only from items whose colour view is all zeros (grey twins in
    training); elsewhere it is held fixed, so it reads shape and where, never colour, and the colour view's
    readout learns the rest (with the encoder's flat ``image_colour_view``, an image's colour alone).
    """

    def __init__(self, embed_dim: int, token_dim: int, llm_dim: int, cfg: InputProjectorConfig,
                 patch_grid: tuple[int, int, int], views: int = 1):
        super().__init__()
        hidden = llm_dim if cfg.hidden_dim is None else cfg.hidden_dim
        self.grid, self.patch_grid, self.num_tokens, self.llm_dim = cfg.grid, patch_grid, cfg.num_tokens, llm_dim
        self.embed_dim = embed_dim
        self.norm = nn.LayerNorm(token_dim)
        self.pooled_norm = nn.LayerNorm(embed_dim)
        width = patch_grid[0] * cfg.grid**2 * token_dim + embed_dim
        self.mlp = (nn.Linear(width, cfg.num_tokens * llm_dim) if hidden == 0 else
                    nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, cfg.num_tokens * llm_dim)))
        self.grey = GridProjector(embed_dim, token_dim, llm_dim, cfg, patch_grid) if views == 2 else None
        if self.grey is not None:
            last = self.grey.mlp if isinstance(self.grey.mlp, nn.Linear) else self.grey.mlp[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.grey is None:
            return self.read(pooled, tokens)
        half, colour_pooled = tokens.shape[1] // 2, pooled[:, : self.embed_dim]
        colour = self.read(colour_pooled, tokens[:, :half])
        grey = self.grey(pooled[:, self.embed_dim :], tokens[:, half:])
        grey_alone = (colour_pooled == 0).all(dim=1) & (tokens[:, :half] == 0).flatten(1).all(dim=1)
        return colour + torch.where(grey_alone[:, None, None], grey, grey.detach())

    def read(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One view's cells and pooled embedding -> ``[B, num_tokens, llm_dim]``."""
        patches = tokens[:, 1:]  # ImageBind's tokens: CLS, then the patch grid in raster order
        frames, rows, cols = self.patch_grid
        if frames * rows * cols != patches.shape[1]:
            raise ValueError(f"grid projector: {patches.shape[1]} patch tokens do not form the encoder's "
                             f"{frames}x{rows}x{cols} patch grid")
        cells = patches.reshape(len(tokens) * frames, rows, cols, -1).permute(0, 3, 1, 2)
        cells = F.adaptive_avg_pool2d(cells, self.grid).flatten(2).transpose(1, 2)  # [B * frames, grid^2, token_dim]
        cells = cells.reshape(len(tokens), frames * self.grid**2, -1)  # each frame's cells, apart
        features = torch.cat([self.norm(cells).flatten(1), self.pooled_norm(pooled)], dim=1)
        return self.mlp(features).view(len(tokens), self.num_tokens, self.llm_dim)


class WordMixture(nn.Module):
    """Soft tokens written in the LLM's own words: each projected token scores every input embedding of the LLM,
    and the soft token is their softmax-weighted mixture. A token can then only be a blend of words the LLM
    already reads, and each can be trained to be the caption's word in its place, which composes: the slot of a
    shape reads the shape, whatever the colour beside it (README, Training)."""

    def __init__(self, projector: nn.Module, embeddings: nn.Embedding, hard: bool = False):
        super().__init__()
        self.projector, self.hard = projector, hard
        self._embeddings = (embeddings,)  # the LLM's, frozen: neither trained nor saved with the projector

    def logits(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[B, k, vocab]: each soft token's score for every word."""
        return self.projector(pooled, tokens) @ self._embeddings[0].weight.T

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The mixture, or with ``hard`` the top word's embedding (straight-through: the mixture's gradient)."""
        weights = self.logits(pooled, tokens).softmax(dim=-1)
        if self.hard:
            top = F.one_hot(weights.argmax(dim=-1), weights.shape[-1]).to(weights.dtype)
            weights = top + weights - weights.detach()
        return weights @ self._embeddings[0].weight


def build_input_projector(cfg: InputProjectorConfig, embed_dim: int, token_dim: int, llm_dim: int,
                          patch_grid: tuple[int, int, int], embeddings: nn.Embedding, views: int = 1) -> nn.Module:
    """``forward(pooled [B, views * embed_dim], tokens [B, views * (1 + frames * rows * cols), token_dim])
    -> [B, k, llm_dim]``; ``patch_grid`` is the encoder's ``(frames, rows, cols)`` of patches, which the grid
    projector folds the tokens back into (each view apart; the others read the views as one wider embedding and
    more tokens); ``embeddings`` are the LLM's input embeddings, which ``cfg.words`` mixes."""
    projector = _input_projector(cfg, embed_dim, token_dim, llm_dim, patch_grid, views)
    return WordMixture(projector, embeddings, cfg.hard_words) if cfg.words else projector


def _input_projector(cfg: InputProjectorConfig, embed_dim: int, token_dim: int, llm_dim: int,
                     patch_grid: tuple[int, int, int], views: int) -> nn.Module:
    if cfg.kind == "grid":
        return GridProjector(embed_dim, token_dim, llm_dim, cfg, patch_grid, views)
    k, embed_dim = cfg.num_tokens, embed_dim * views
    if cfg.kind == "linear":
        return PooledProjector(nn.Linear(embed_dim, k * llm_dim), k, llm_dim)
    if cfg.kind == "mlp":
        hidden = cfg.hidden_dim or llm_dim
        mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, k * llm_dim))
        return PooledProjector(mlp, k, llm_dim)
    return Resampler(token_dim, llm_dim, cfg)


class OutputProjector(nn.Module):
    """Signal hidden states in, one tensor per declared conditioning out.

    ``spec`` is the generator's declared conditioning, name -> (sequence length, width); e.g. SD 1.5 gives
    ``{"prompt_embeds": (77, 768)}`` and AudioLDM-2 gives two entries. NExT-GPT's transformer (learned queries, one
    per output position) learns a lookup of the captions it saw, so it fails on attribute combinations never seen
    in training. A linear map composes but fits the seen captions less well, so ``cfg.linear_rank`` > 0 adds a
    low-rank linear path beside the transformer (README, Training, has the numbers).

    Both ends are standardised per value with statistics of training data (``standardize``): an LLM's last-layer
    states share a large constant part, and what differs between prompts is a few percent of their norm; unscaled,
    the projector must grow huge weights to see it (toy world: 8000 steps to 0.83 retrieval, vs 250 steps to 1.0
    standardised). Text-encoder conditionings are alike in the same way, so the projector predicts standardised
    targets, and the shared part costs it nothing to learn.
    """

    state_mean: torch.Tensor
    state_std: torch.Tensor
    target_mean: torch.Tensor
    target_std: torch.Tensor

    def __init__(self, llm_dim: int, num_signal: int, spec: dict[str, Shape], cfg: OutputProjectorConfig):
        super().__init__()
        self.spec = dict(spec)
        self.register_buffer("state_mean", torch.zeros(num_signal, llm_dim))
        self.register_buffer("state_std", torch.ones(num_signal, llm_dim))
        total = sum(math.prod(shape) for shape in spec.values())
        self.register_buffer("target_mean", torch.zeros(total))
        self.register_buffer("target_std", torch.ones(total))
        self.body = QueryDecoderBody(llm_dim, spec, cfg)
        self.linear = LowRankLinear(num_signal * llm_dim, total, cfg.linear_rank) if cfg.linear_rank else None

    @torch.no_grad()
    def standardize(self, signal_states: torch.Tensor, targets: dict[str, torch.Tensor]) -> None:
        """Set the statistics from training signal states [N, n_signal, llm_dim] and their targets, name ->
        [N, seq, width]. A value that hardly varies gets a spread of 1% of the mean one, so it cannot blow up."""
        flat = torch.cat([targets[name].flatten(1) for name in self.spec], dim=1)
        for values, mean, std in ((signal_states, self.state_mean, self.state_std),
                                  (flat, self.target_mean, self.target_std)):
            spread = values.float().std(dim=0, unbiased=False)
            mean.copy_(values.float().mean(dim=0))
            std.copy_(spread.clamp_min(0.01 * spread.mean().item() + 1e-6))

    def forward(self, signal_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """``signal_states`` [B, n_signal, llm_dim] -> {name: [B, seq, width]}."""
        states = (signal_states - self.state_mean) / self.state_std
        flat = self.body(states) if self.linear is None else self.body(states) + self.linear(states)
        flat = flat * self.target_std + self.target_mean  # [B, sum of seq * width]
        out, start = {}, 0
        for name, shape in self.spec.items():
            out[name] = flat[:, start : start + math.prod(shape)].view(-1, *shape)
            start += math.prod(shape)
        return out


class LowRankLinear(nn.Module):
    """Standardised signal states, flattened, through a rank-``rank`` linear map to every output value."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(states.flatten(1)))


class QueryDecoderBody(nn.Module):
    """NExT-GPT's transformer: an encoder over the signal states, then one learned query per output position."""

    def __init__(self, llm_dim: int, spec: dict[str, Shape], cfg: OutputProjectorConfig):
        super().__init__()
        d = cfg.d_model
        self.spec = {name: _seq_width(shape) for name, shape in spec.items()}
        self.inp = nn.Linear(llm_dim, d)
        layer_args: dict[str, Any] = {"dropout": 0.0, "batch_first": True, "norm_first": True}
        self.encoder = (
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(d, cfg.heads, cfg.feedforward, **layer_args),
                cfg.encoder_layers,
                enable_nested_tensor=False,
            )
            if cfg.encoder_layers
            else None
        )
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d, cfg.heads, cfg.feedforward, **layer_args), cfg.decoder_layers
        )
        self.queries = nn.ParameterDict({n: nn.Parameter(torch.randn(s, d) * 0.02) for n, (s, _) in self.spec.items()})
        self.heads = nn.ModuleDict({n: nn.Linear(d, width) for n, (_, width) in self.spec.items()})

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        memory = self.inp(states)
        if self.encoder is not None:
            memory = self.encoder(memory)
        names = list(self.spec)
        queries = torch.cat([self.queries[n] for n in names]).unsqueeze(0).expand(len(states), -1, -1)
        decoded = self.decoder(queries, memory)
        parts, start = [], 0
        for name in names:
            length = self.spec[name][0]
            parts.append(self.heads[name](decoded[:, start : start + length]).flatten(1))
            start += length
        return torch.cat(parts, dim=1)


class TextFcProjector(nn.Module):
    """NExT-GPT's TextFcLayer (mode ``transformer``), with its parameter names, so its state dict loads unchanged.

    ``fc`` maps the signal states (plus their input embeddings, added by the caller) to ``d_model``; a full
    ``nn.Transformer`` (pre-norm, so with final encoder and decoder norms) reads them as its source and learned
    ``query_embs`` as its target; ``model`` maps each query to the conditioning width. One conditioning tensor only.
    """

    def __init__(self, llm_dim: int, spec: dict[str, Shape], cfg: OutputProjectorConfig):
        super().__init__()
        if len(spec) != 1:
            raise ValueError(f"output_projector.kind=textfc makes one conditioning tensor; the generator declares "
                             f"{sorted(spec)} (use kind: query)")
        (self.name, self.shape), = spec.items()
        length, width = _seq_width(self.shape)
        d = cfg.d_model
        self.fc = nn.Linear(llm_dim, d)
        with warnings.catch_warnings():  # "enable_nested_tensor ... norm_first": nested tensors are not used anyway
            warnings.simplefilter("ignore", UserWarning)
            self.tfm = nn.Transformer(d_model=d, nhead=cfg.heads, num_encoder_layers=cfg.encoder_layers,
                                      num_decoder_layers=cfg.decoder_layers, dim_feedforward=cfg.feedforward,
                                      dropout=0.0, batch_first=True, norm_first=True)
        self.model = nn.Linear(d, width)
        self.query_embs = nn.Parameter(torch.randn(1, length, d))

    def standardize(self, signal_states: torch.Tensor, targets: dict[str, torch.Tensor]) -> None:
        """Nothing to set: NExT-GPT's layer reads raw states and predicts raw targets (decoder alignment calls this)."""

    def forward(self, signal_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """``signal_states`` [B, n_signal, llm_dim] -> {name: [B, *shape]}."""
        x = self.fc(signal_states)
        out = self.model(self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1)))
        return {self.name: out.reshape(-1, *self.shape)}


def build_output_projector(llm_dim: int, num_signal: int, spec: dict[str, Shape],
                           cfg: OutputProjectorConfig) -> nn.Module:
    """``forward(signal_states [B, n_signal, llm_dim]) -> {name: [B, *spec[name]]}``, of the configured kind."""
    if cfg.kind == "textfc":
        return TextFcProjector(llm_dim, spec, cfg)
    return OutputProjector(llm_dim, num_signal, spec, cfg)
