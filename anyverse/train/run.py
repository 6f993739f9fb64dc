"""Entry point of ``anyverse train STAGE --config FILE``: validate the config, build the recipe, run the loop."""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import platform
from pathlib import Path
from typing import Any

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


def make_accelerator() -> Any:
    """The Accelerator of a run: single process, or whatever ``accelerate launch --config_file`` set up (DDP, FSDP,
    DeepSpeed; examples in ``anyverse/train/configs/accelerate/``)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    # some projectors/modalities are absent from a batch: DDP must not wait for their gradients
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:  # every process would train alone into the same output_dir
        raise ConfigError(f"accelerate launch started {launched} processes but each runs alone "
                          f"({accelerator.distributed_type} on {accelerator.device}): without GPUs, set "
                          "ACCELERATE_USE_CPU=true (see anyverse/train/configs/accelerate/ddp-cpu.yaml)")
    for name, variable, kind in (("FSDP", "ACCELERATE_USE_FSDP", DistributedType.FSDP),
                                 ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):
        if os.environ.get(variable, "").lower() == "true" and accelerator.distributed_type != kind:
            # accelerate only shards on accelerators: with ACCELERATE_USE_CPU it silently runs gloo DDP instead
            log.warning("the accelerate config asks for %s but accelerate runs %s on %s (it only shards on GPUs and "
                        "other accelerators): training with full replicas", name, accelerator.distributed_type,
                        accelerator.device)
    return accelerator


def keep_freed_memory() -> None:
    """glibc only: reuse freed memory instead of mapping fresh pages for each step's tensors (mmap threshold 32 MB,
    trimming above 1 GB). A fresh process otherwise maps and zeroes them page by page until glibc's threshold has
    grown: 200 toy encoder-alignment steps took 42-47 s in a fresh process, 30-32 s with this."""
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 32 * 2**20)
    libc.mallopt(m_trim_threshold, 2**30)


def run_config(config: TrainConfig, resume: bool = True) -> Path:
    """Train one stage (resuming from the newest checkpoint in ``output_dir`` if any); returns the last checkpoint."""
    keep_freed_memory()
    module, name = RECIPES[config.stage].split(":")
    recipe_class = getattr(importlib.import_module(module), name)
    accelerator = make_accelerator()
    recipe = recipe_class(config, accelerator.device)
    return train(recipe, config, accelerator, resume)


def run_stage(stage: str, config_path: Path, overrides: list[str] | None = None, resume: bool = True) -> Path:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    config = load_train_config(config_path, overrides)
    if config.stage != stage:
        raise ConfigError(f"{config_path}: this config is for stage {config.stage!r}, not {stage!r}")
    return run_config(config, resume)
