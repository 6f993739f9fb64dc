"""The one training loop every recipe runs in: accelerate (single process or ``accelerate launch``), AdamW with
warmup + cosine, a data order fixed by (seed, step) so resume and multi-process runs see the same batches, JSONL
metrics (TensorBoard too when installed), periodic eval and atomic checkpoints that resume exactly.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from anyverse.checkpoint import load_state, save_state, step_dirs, write_checkpoint
from anyverse.config import AnyverseConfig
from anyverse.train.config import TrainConfig

log = logging.getLogger(__name__)

TRAINABLE = "trainable.safetensors"


class Recipe(Protocol):
    """A training stage. It is the module accelerate wraps: ``forward(batch)`` returns (loss, metrics)."""

    items: list[Any]
    model_config: AnyverseConfig
    base: dict[str, Any]

    def __call__(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...
    def collate(self, items: list[Any]) -> Any: ...
    def param_groups(self) -> list[dict[str, Any]]: ...
    def evaluate(self) -> dict[str, float]: ...
    def artifacts(self, directory: Path) -> dict[tuple[str | None, str], str | None]: ...
    def named_parameters(self) -> Any: ...
    def train(self, mode: bool = True) -> Any: ...


def batch_indices(step: int, size: int, num_items: int, seed: int) -> list[int]:
    """The global batch for ``step``: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    start = step * size
    indices: list[int] = []
    while len(indices) < size:
        epoch, offset = divmod(start + len(indices), num_items)
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        indices += order[offset : offset + size - len(indices)]
    return indices


def lr_lambda(config: TrainConfig):  # type: ignore[no-untyped-def]
    warmup, total, schedule = config.optim.warmup_steps, config.steps, config.optim.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class MetricsLog:
    """Append-only JSONL (the record tests and plots read) plus TensorBoard scalars when it is installed."""

    def __init__(self, directory: Path, enabled: bool):
        self.enabled = enabled
        self.path = directory / "metrics.jsonl"
        self.board: Any = None
        if enabled:
            directory.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(directory / "tensorboard"))
            except ImportError:
                log.debug("tensorboard not installed; metrics go to %s only", self.path)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as out:
            out.write(json.dumps({"step": step, **values}) + "\n")
        if self.board is not None:
            for key, value in values.items():
                self.board.add_scalar(key, value, step)


def _trainable_state(recipe: Recipe) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in recipe.named_parameters() if p.requires_grad}


def _load_trainable(recipe: Recipe, path: Path) -> None:
    state = load_file(str(path))
    params = {name: p for name, p in recipe.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        raise ValueError(f"{path}: trainable parameters differ from this config's; resume with the config the run "
                         "started with")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def train(recipe: Recipe, config: TrainConfig, accelerator: Any, resume: bool = True) -> Path:
    """Run ``config.steps`` optimizer steps of ``recipe``; returns the final checkpoint directory."""
    out = config.output_dir
    main = accelerator.is_main_process
    optimizer = torch.optim.AdamW(recipe.param_groups(), weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    torch.manual_seed(config.seed)
    start = 0
    previous = step_dirs(out) if resume else []
    if previous:
        _load_trainable(recipe, previous[-1] / "state" / TRAINABLE)
        meta = load_state(previous[-1] / "state", optimizer, scheduler)
        start = meta["step"]
        if meta.get("world_size") != accelerator.num_processes:
            log.warning("resuming a %s-process run with %s processes: the data order changes",
                        meta.get("world_size"), accelerator.num_processes)
        log.info("resuming %s from step %d", out, start)
    module, optimizer = accelerator.prepare(recipe, optimizer)
    metrics = MetricsLog(out, main)
    world, rank = accelerator.num_processes, accelerator.process_index
    trainable = [p for p in recipe.parameters() if p.requires_grad] if isinstance(recipe, nn.Module) else []
    progress = _progress(config, start, main)
    final = out / f"step-{config.steps:06d}"
    for step in range(start, config.steps):
        tick = time.perf_counter()
        indices = batch_indices(step, config.batch_size * world, len(recipe.items), config.seed)
        mine = indices[rank * config.batch_size : (rank + 1) * config.batch_size]
        recipe.train()
        loss, values = module(recipe.collate([recipe.items[i] for i in mine]))
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            metrics.write(done, {"loss": loss.item(), "lr": float(scheduler.get_last_lr()[0]),
                                 "seconds": time.perf_counter() - tick, **values})
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        last = done == config.steps
        if (config.save_every and done % config.save_every == 0) or last:
            accelerator.wait_for_everyone()
            if main:
                _save(recipe, config, optimizer, scheduler, done, world, out)
            accelerator.wait_for_everyone()
        if main and ((config.eval_every and done % config.eval_every == 0) or last) and config.data.eval:
            recipe.train(False)
            with torch.random.fork_rng(devices=[]):  # eval sampling must not shift the training RNG stream
                scores = recipe.evaluate()
            metrics.write(done, {f"eval/{k}": v for k, v in scores.items()})
            log.info("step %d eval: %s", done, scores)
    progress.close()
    accelerator.wait_for_everyone()
    return final


def _progress(config: TrainConfig, start: int, main: bool):  # type: ignore[no-untyped-def]
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc=config.stage, disable=not main, leave=False)


def _save(recipe: Recipe, config: TrainConfig, optimizer: Any, scheduler: Any, step: int, world: int,
          out: Path) -> None:
    def state(directory: Path) -> None:
        save_file(_trainable_state(recipe), str(directory / TRAINABLE))
        save_state(directory, optimizer, scheduler, step, {"world_size": world, "seed": config.seed})

    write_checkpoint(out / f"step-{step:06d}", stage=config.stage, step=step, config=recipe.model_config,
                     train_yaml=config.to_yaml(), base=recipe.base, artifacts=recipe.artifacts, state=state)
    for old in step_dirs(out)[: -config.keep_checkpoints]:
        shutil.rmtree(old)
