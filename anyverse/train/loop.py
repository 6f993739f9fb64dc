"""The one training loop every recipe runs in: accelerate (single process or ``accelerate launch``), AdamW with
warmup + cosine, a data order fixed by (seed, step) so resume and multi-process runs see the same batches, JSONL
metrics (TensorBoard too when installed), periodic eval and atomic checkpoints that resume exactly.

Under ``accelerate launch`` (example configs in ``configs/accelerate/``): with DDP every process holds the whole
recipe, so the main process saves and evaluates alone. With FSDP (v1, ``use_orig_params``) each process holds a
shard: all processes gather the trained tensors whole on rank 0 (``summon_full_params``; the FSDP units are swapped
for the modules they wrap meanwhile, so the recipe's own ``artifacts`` and peft see a plain model) and the optimizer
state as a full state dict, and the main process writes the checkpoint a single-process run writes (resume scatters
it back); eval runs on every process in step. With DeepSpeed ZeRO-2 the parameters stay replicated and save as
under DDP (bf16 when the run is); its partitioned AdamW moments are not saved, so a resumed run restarts them.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
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
# what FSDP (and activation checkpointing) insert into parameter names; checkpoints store the names without them
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class Recipe(Protocol):
    """A training stage. It is the module accelerate wraps: ``forward(batch)`` returns (loss, metrics)."""

    items: Sequence[Any]
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


def _clean(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _trainable_state(recipe: Recipe) -> dict[str, torch.Tensor]:
    return {_clean(name): p.detach().cpu().contiguous() for name, p in recipe.named_parameters() if p.requires_grad}


def _load_trainable(recipe: Recipe, path: Path) -> None:
    state = load_file(str(path))
    params = {name: p for name, p in recipe.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        raise ValueError(f"{path}: trainable parameters differ from this config's; resume with the config the run "
                         "started with")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def final_checkpoint(config: TrainConfig) -> Path:
    """The checkpoint a run of ``config`` ends with; its manifest is there once the run has finished."""
    return config.output_dir / f"step-{config.steps:06d}"


def train(recipe: Recipe, config: TrainConfig, accelerator: Any, resume: bool = True) -> Path:
    """Run ``config.steps`` optimizer steps of ``recipe``; returns the final checkpoint directory."""
    out = config.output_dir
    main = accelerator.is_main_process
    kind = _sharding(accelerator)
    optimizer = torch.optim.AdamW(recipe.param_groups(), weight_decay=config.optim.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    torch.manual_seed(config.seed)
    start = 0
    previous = step_dirs(out) if resume else []
    if previous:  # weights go in before wrapping (FSDP shards what it is given, DeepSpeed copies it)
        _load_trainable(recipe, previous[-1] / "state" / TRAINABLE)
    if kind == "deepspeed":  # accelerate takes the micro-batch from a dataloader; this loop has none
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
    if kind == "fsdp":
        _cast_unit_inputs(accelerator)
    raw_optimizer = optimizer
    if previous and kind == "":
        meta = load_state(previous[-1] / "state", optimizer, scheduler)
    module, optimizer = accelerator.prepare(recipe, optimizer)
    if previous and kind != "":  # the optimizer state of a sharded model is restored after sharding
        meta = load_state(previous[-1] / "state", _state_adapter(kind, module, raw_optimizer, accelerator),
                          scheduler)
    if previous:
        start = meta["step"]
        if meta.get("world_size") != accelerator.num_processes:
            log.warning("resuming a %s-process run with %s processes: the data order changes",
                        meta.get("world_size"), accelerator.num_processes)
        log.info("resuming %s from step %d", out, start)
    metrics = MetricsLog(out, main)
    world, rank = accelerator.num_processes, accelerator.process_index
    if kind == "fsdp":  # FSDP clips by the global norm only when given exactly the wrapped module's parameters
        clipped = list(module.parameters())
    else:
        clipped = [p for p in recipe.parameters() if p.requires_grad] if isinstance(recipe, nn.Module) else []
    progress = _progress(config, start, main)
    final = final_checkpoint(config)
    for step in range(start, config.steps):
        tick = time.perf_counter()
        indices = batch_indices(step, config.batch_size * world, len(recipe.items), config.seed)
        mine = indices[rank * config.batch_size : (rank + 1) * config.batch_size]
        recipe.train()
        with _deepspeed_autocast(kind, accelerator):
            loss, values = module(recipe.collate([recipe.items[i] for i in mine]))
        if kind == "deepspeed":  # ZeRO reduces gradients in buckets as they arrive: every process needs every one
            loss = loss + sum(p.sum() for p in clipped) * 0.0
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(clipped, config.optim.grad_clip)
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
            # collective under FSDP: every process gathers, the main process alone writes
            adapter = _state_adapter(kind, module, raw_optimizer, accelerator)
            optimizer_state = adapter.state_dict() if main or kind == "fsdp" else {}
            with _full_parameters(kind, module, recipe, accelerator):
                if main:
                    _save(recipe, config, _Snapshot(optimizer_state), scheduler, done, world, out)
            accelerator.wait_for_everyone()
        if ((config.eval_every and done % config.eval_every == 0) or last) and config.data.eval:
            scores = _evaluate(kind, recipe, module, accelerator)
            if main:
                metrics.write(done, {f"eval/{k}": v for k, v in scores.items()})
                log.info("step %d eval: %s", done, scores)
    progress.close()
    accelerator.wait_for_everyone()
    return final


def _sharding(accelerator: Any) -> str:
    """"fsdp" or "deepspeed" when ``accelerate launch`` shards the model or its optimizer; "" otherwise."""
    from accelerate.utils import DistributedType

    distributed = getattr(accelerator, "distributed_type", None)
    if distributed == DistributedType.FSDP and getattr(accelerator, "is_fsdp2", False):
        raise ValueError("FSDP2 (fsdp_version: 2) is not supported by the training loop: use fsdp_version: 1 "
                         "(anyverse/train/configs/accelerate/fsdp.yaml)")
    return {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(distributed, "")


def _cast_unit_inputs(accelerator: Any) -> None:
    """FSDP mixed precision: every unit casts its inputs to the compute dtype. Training runs under accelerate's
    autocast, but eval calls the recipe's modules (in generate's thread) with the root unit's full-precision
    tensors feeding bf16 decoder layers."""
    import dataclasses

    from torch.distributed.fsdp import MixedPrecision

    plugin = accelerator.state.fsdp_plugin
    if isinstance(plugin.mixed_precision_policy, MixedPrecision):
        plugin.mixed_precision_policy = dataclasses.replace(plugin.mixed_precision_policy, cast_forward_inputs=True)


def _deepspeed_autocast(kind: str, accelerator: Any) -> Any:
    """DeepSpeed bf16/fp16 casts the whole model (no autocast, unlike accelerate's own mixed precision): the recipes
    feed it fp32 encoder features, so its forward and eval run under torch.autocast."""
    if kind != "deepspeed":
        return nullcontext()
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if str(config.get(name, {}).get("enabled", False)).lower() == "true":
            return torch.autocast(device_type=accelerator.device.type, dtype=dtype)
    return nullcontext()


def _offload(accelerator: Any) -> bool:
    return bool(accelerator.device.type != "cpu")


@contextmanager
def _full_parameters(kind: str, module: Any, recipe: Recipe, accelerator: Any) -> Iterator[None]:
    """Under FSDP (collective): every tensor whole on rank 0, offloaded to CPU, and the FSDP units swapped for the
    modules they wrap, so the main process saves with the recipe's own ``artifacts`` and sees a plain model's names
    (peft's adapter saving walks module names and would drop LoRA weights under a mid-name FSDP prefix)."""
    if kind != "fsdp":
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    gathered = FSDP.summon_full_params(module, writeback=False, rank0_only=True, offload_to_cpu=_offload(accelerator))
    with gathered, _without_wrappers(recipe) if accelerator.is_main_process else nullcontext():
        yield


def _inner(module: nn.Module) -> nn.Module:
    while True:
        inner = getattr(module, "_fsdp_wrapped_module", None) or getattr(module, "_checkpoint_wrapped_module", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


@contextmanager
def _without_wrappers(recipe: Recipe) -> Iterator[None]:
    """FSDP and activation-checkpoint wrappers inside ``recipe`` replaced by what they wrap, then put back."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    if isinstance(recipe, nn.Module):
        for parent in list(recipe.modules()):
            for name, child in list(parent.named_children()):
                if (inner := _inner(child)) is not child:
                    parent._modules[name] = inner
                    swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


def _evaluate(kind: str, recipe: Recipe, module: Any, accelerator: Any) -> dict[str, float]:
    """The recipe's eval (main process; under FSDP every process, in step: its sub-units gather themselves)."""
    if kind != "fsdp" and not accelerator.is_main_process:
        return {}
    recipe.train(False)
    context: Any = nullcontext()
    if kind == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # the root unit (embeddings, head, projectors) whole on every process; the decoder layers stay FSDP units,
        # and generate() keeps every process stepping until all are done (synced_gpus)
        context = FSDP.summon_full_params(module, recurse=False, writeback=False)
        _mark_fsdp_managed(recipe)
    with context, _deepspeed_autocast(kind, accelerator), torch.random.fork_rng(devices=[]):
        return recipe.evaluate()  # eval sampling (forked RNG) must not shift the training RNG stream


def _mark_fsdp_managed(recipe: Recipe) -> None:
    """transformers' ``generate`` runs synced (no process stops early) on models flagged as FSDP-managed."""
    if isinstance(recipe, nn.Module):
        from transformers import PreTrainedModel

        for child in recipe.modules():
            if isinstance(child, PreTrainedModel):
                object.__setattr__(child, "_is_fsdp_managed_module", True)


class _Snapshot:
    """An optimizer state already gathered, in the shape ``checkpoint.save_state`` reads."""

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


class _FSDPOptimizerState:
    """Full (unsharded) optimizer state of an FSDP model keyed like a plain ``optimizer.state_dict()`` (parameter
    indices in ``param_groups`` order), so FSDP, DDP and single-process checkpoints are the same format."""

    def __init__(self, module: Any, optimizer: torch.optim.Optimizer, accelerator: Any):
        self.module, self.optimizer, self.offload = module, optimizer, _offload(accelerator)
        names = {id(p): _clean(n) for n, p in module.named_parameters()}
        self.names = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]

    @contextmanager
    def _configured(self, rank0_only: bool) -> Iterator[None]:
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with warnings.catch_warnings():  # FSDP1's state_dict_type is deprecated in favour of DCP's get_state_dict
            warnings.simplefilter("ignore", FutureWarning)
            with FSDP.state_dict_type(self.module, StateDictType.FULL_STATE_DICT,
                                      FullStateDictConfig(offload_to_cpu=self.offload, rank0_only=rank0_only),
                                      FullOptimStateDictConfig(offload_to_cpu=self.offload, rank0_only=rank0_only)):
                yield

    def state_dict(self) -> dict[str, Any]:
        """Collective: every process calls it; rank 0 gets the full state."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with self._configured(rank0_only=True):
            full = FSDP.optim_state_dict(self.module, self.optimizer)
        index = {name: i for i, name in enumerate(self.names)}
        groups = self.optimizer.state_dict()["param_groups"]
        return {"state": {index[name]: slots for name, slots in full.get("state", {}).items()},
                "param_groups": groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Collective: every process reads the same full state and keeps its shard."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        full = {"state": {self.names[i]: slots for i, slots in state["state"].items()},
                "param_groups": [{**g, "params": [self.names[i] for i in g["params"]]}
                                 for g in state["param_groups"]]}
        with self._configured(rank0_only=False):
            sharded = FSDP.optim_state_dict_to_load(self.module, self.optimizer, full)
        self.optimizer.load_state_dict(sharded)


class _UnsavedOptimizerState:
    """DeepSpeed partitions AdamW's moments across processes in its own layout: they are not saved, and a resumed
    run restarts them (weights, schedule, step and RNG are restored)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"state": {}, "param_groups": self.groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        log.warning("DeepSpeed: resuming without the optimizer's moments (not saved under ZeRO)")


def _state_adapter(kind: str, module: Any, optimizer: torch.optim.Optimizer, accelerator: Any) -> Any:
    if kind == "fsdp":
        return _FSDPOptimizerState(module, optimizer, accelerator)
    if kind == "deepspeed":
        return _UnsavedOptimizerState(optimizer)
    return optimizer


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
