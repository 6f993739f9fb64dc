"""One validated schema for every training recipe; impossible combinations fail before any weight is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator

from anyverse.config import ConfigError, Strict, _apply_override, _read_yaml, validation_error
from anyverse.types import Modality
from anyverse.weights import expand

Stage = Literal["lm-pretrain", "encoder-pretrain", "encoder-alignment", "decoder-alignment", "instruction-tuning"]
STAGES: tuple[Stage, ...] = ("lm-pretrain", "encoder-pretrain", "encoder-alignment", "decoder-alignment",
                             "instruction-tuning")


class DataConfig(Strict):
    """Manifests: pairs for pretraining and alignment, dialogs for instruction tuning; text for lm-pretrain."""

    train: Path
    eval: Path | None = Field(default=None, description="held-out manifest for periodic eval")
    text: Path | None = Field(default=None, description="lm-pretrain: extra plain-text corpus, one line each")
    max_eval_items: int = Field(default=64, gt=0)


class OptimConfig(Strict):
    lr: float = Field(default=1e-3, gt=0)
    projector_lr: float | None = Field(default=None, gt=0, description="defaults to lr")
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = Field(default=1.0, gt=0)


class LossConfig(Strict):
    """Loss weights. ``lm`` weighs the reply's cross-entropy (encoder alignment, instruction tuning); decoder side,
    ``l2`` is NExT-GPT's per-token Euclidean distance, averaged, ``cosine`` is 1 - cos, and ``denoise`` is the
    generator's own diffusion loss on the caption's media (NExT-GPT / GILL)."""

    lm: float = Field(default=1.0, ge=0)
    l2: float = Field(default=1.0, ge=0)
    cosine: float = Field(default=0.0, ge=0)
    denoise: float = Field(default=0.0, ge=0, description="decoder alignment: weight of the denoising loss")
    words: float = Field(default=0.0, ge=0, description="encoder alignment: weight of the cross-entropy of each soft "
                         "token's word scores against the caption's word in its place (projectors with words: true)")


class TrainConfig(Strict):
    stage: Stage
    model: str = Field(default="tiny", description="profile name, config YAML, or a checkpoint directory")
    model_overrides: list[str] = Field(default_factory=list, description="key.path=value on the model config")
    data: DataConfig
    output_dir: Path
    seed: int = 0
    steps: int = Field(gt=0)
    batch_size: int = Field(default=8, gt=0, description="per process")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    modalities: list[Modality] | None = Field(default=None, description="projectors to train; None: all in the data "
                                              "(instruction tuning: [] keeps the input projectors frozen)")
    output_modes: list[Literal["meta", "signal"]] = Field(
        default=["meta", "signal"], description="instruction tuning: render dialogs in these modes")
    conversation_repeats: int = Field(default=1, gt=0, description="instruction tuning: each turn of a multi-turn "
                                      "dialog is seen this many times an epoch (conversations are few)")
    train_lora: bool = Field(default=True, description="instruction tuning: LoRA on the LLM")
    log_every: int = Field(default=10, gt=0)
    eval_every: int = Field(default=0, ge=0, description="0: only at the end")
    save_every: int = Field(default=0, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(default=2, gt=0)
    lm_arch: dict[str, int] = Field(default_factory=dict, description="lm-pretrain: tiny Llama sizes")
    copy_drills: int = Field(default=0, ge=0, description="lm-pretrain: copy drills per caption pair")
    encoder_arch: dict[str, int | list[int]] = Field(
        default_factory=dict, description="encoder-pretrain: tiny ImageBind sizes (kernel_size: [t, h, w])")
    temperature: float = Field(default=0.07, gt=0, description="encoder-pretrain: InfoNCE temperature")
    grey: float = Field(default=0.0, ge=0, le=1, description="chance an item with a colour attribute is shown in "
                        "grey and its colour word is not trained: images in encoder-pretrain (captioned without it), "
                        "images and videos in encoder-alignment (the encoder's grey view alone)")
    train_token_embeddings: bool = Field(default=True, description="encoder-pretrain: train the text tower's "
                                         "token embedding table (most of a tiny tower's weights; a small "
                                         "vocabulary uses few of its rows); false keeps it at its random init")
    train_clips: int | None = Field(default=None, gt=0, description="encoder-pretrain: clips of each audio/video "
                                    "item seen per step, drawn at random (eval averages all); None: all")

    @model_validator(mode="after")
    def _possible(self) -> TrainConfig:
        if self.stage == "instruction-tuning" and not self.output_modes:
            raise ValueError("output_modes: instruction tuning needs at least one of meta, signal")
        if self.stage == "encoder-alignment" and self.loss.lm + self.loss.words == 0:
            raise ValueError("loss: encoder alignment needs lm or words > 0")
        if self.stage == "decoder-alignment" and self.loss.l2 + self.loss.cosine + self.loss.denoise == 0:
            raise ValueError("loss: decoder alignment needs l2, cosine or denoise > 0 (LM loss alone trains nothing)")
        bad = [m.value for m in self.modalities or [] if m == Modality.TEXT]
        if bad:
            raise ValueError("modalities: text has no projector")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_train_config(path: Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training YAML and apply ``key.path=value`` overrides; paths may use ``~`` and ``${ANYVERSE_HOME}``."""
    if not path.is_file():
        raise ConfigError(f"{path}: training config not found")
    data = _read_yaml(path.read_text(), str(path))
    for override in overrides or []:
        _apply_override(data, override)
    try:
        config = TrainConfig.model_validate(data)
    except ValueError as err:
        raise validation_error(str(path), err) from None
    paths = {name: expand(str(value)) for name in ("train", "eval", "text")
             if (value := getattr(config.data, name)) is not None}
    return config.model_copy(update={"data": config.data.model_copy(update=paths),
                                     "output_dir": expand(str(config.output_dir))})
