"""Entry point of ``anyverse train STAGE --config FILE``: validate the config, build the recipe, run the loop."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from anyverse.config import ConfigError
from anyverse.train.config import STAGES, TrainConfig, load_train_config
from anyverse.train.loop import train

log = logging.getLogger(__name__)

RECIPES = {
    "lm-pretrain": "anyverse.train.lm_pretrain:LMPretrain",
    "encoder-pretrain": "anyverse.train.encoder_pretrain:EncoderPretrain",
    "encoder-alignment": "anyverse.train.encoder_alignment:EncoderAlignment",
    "decoder-alignment": "anyverse.train.decoder_alignment:DecoderAlignment",
    "instruction-tuning": "anyverse.train.instruction_tuning:InstructionTuning",
}


def run_config(config: TrainConfig, resume: bool = True) -> Path:
    """Train one stage (resuming from the newest checkpoint in ``output_dir`` if any); returns the last checkpoint."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    module, name = RECIPES[config.stage].split(":")
    recipe_class = getattr(importlib.import_module(module), name)
    # some projectors/modalities are absent from a batch: DDP must not wait for their gradients
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    recipe = recipe_class(config, accelerator.device)
    return train(recipe, config, accelerator, resume)


def run_stage(stage: str, config_path: Path, overrides: list[str] | None = None, resume: bool = True) -> Path:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    config = load_train_config(config_path, overrides)
    if config.stage != stage:
        raise ConfigError(f"{config_path}: this config is for stage {config.stage!r}, not {stage!r}")
    return run_config(config, resume)
