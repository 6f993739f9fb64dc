"""Checkpoints: only what trained (safetensors, peft adapter, or a pretrained component) + resolved configs +
a manifest (base model identity, file hashes and tensor shapes, library versions), validated on load.

A checkpoint directory also holds ``state/`` (optimizer, scheduler, step, RNG) so a run resumes exactly. Optimizer
tensors are stored as safetensors and the rest as JSON, so nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anyverse.config import AnyverseConfig, _apply_override, validation_error

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
TRAIN_CONFIG = "train.yaml"
PROJECTORS = "projectors.safetensors"
ADAPTER = "adapter"
_STEP_DIR = re.compile(r"step-(\d+)")
# config fields that point at files a checkpoint may hold itself (stored relative to the checkpoint)
_PATH_FIELDS = (("encoder", "path"), ("llm", "path"), ("llm", "adapter"), (None, "projector_weights"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    return {name: version(name) for name in ("anyverse", "torch", "transformers", "peft", "diffusers", "accelerate")}


def _describe_files(directory: Path) -> dict[str, Any]:
    """sha256 of every weight file, and tensor shapes of safetensors files (what a loader checks first)."""
    files: dict[str, Any] = {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.relative_to(directory).parts[0] == "state" or path.name == MANIFEST:
            continue
        entry: dict[str, Any] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as reader:
                entry["tensors"] = {k: list(reader.get_slice(k).get_shape()) for k in reader.keys()}  # noqa: SIM118
        files[path.relative_to(directory).as_posix()] = entry
    return files


def write_checkpoint(directory: Path, *, stage: str, step: int, config: AnyverseConfig, train_yaml: str,
                     base: dict[str, Any], artifacts: Callable[[Path], dict[tuple[str | None, str], str | None]],
                     state: Callable[[Path], None] | None = None) -> Path:
    """Write a complete checkpoint into ``directory`` atomically (a temp dir renamed into place).

    ``artifacts(tmp)`` writes the trained parts and returns the config fields that now point inside the checkpoint
    (e.g. ``{("llm", "adapter"): "adapter"}``); ``state(tmp / "state")`` writes resume state.
    """
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    data = config.model_dump(mode="json")
    for (section, key), value in artifacts(tmp).items():
        (data[section] if section else data)[key] = value
    (tmp / CONFIG).write_text(yaml.safe_dump(data, sort_keys=False))
    (tmp / TRAIN_CONFIG).write_text(train_yaml)
    if state is not None:
        (tmp / "state").mkdir()
        state(tmp / "state")
    manifest = {"format": FORMAT, "stage": stage, "step": step, "base": base, "files": _describe_files(tmp),
                "versions": _versions()}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def step_dirs(run_dir: Path) -> list[Path]:
    """Complete ``step-N`` checkpoints of a run, oldest first."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("step-*")
             if (m := _STEP_DIR.fullmatch(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint, else the newest ``step-N`` checkpoint inside a run directory."""
    if (path / MANIFEST).is_file():
        return path
    steps = step_dirs(path) if path.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{path}: not a checkpoint (no {MANIFEST}) and no step-N checkpoints inside")
    return steps[-1]


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable checkpoint manifest ({err})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {manifest.get('format')!r}, this anyverse reads {FORMAT}")
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists with the recorded hash: a truncated copy fails here, not mid-run."""
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{directory}: checkpoint file {name} is missing")
        if _sha256(path) != entry["sha256"]:
            raise ValueError(f"{directory}: checkpoint file {name} does not match its manifest hash (corrupt copy?)")


BaseCheck = Callable[[dict[str, Any]], None]


def checkpoint_config(path: Path, overrides: list[str] | None = None) -> tuple[AnyverseConfig, BaseCheck]:
    """The resolved model config of a checkpoint (its own files as absolute paths), and the check a loaded base
    model's fingerprint must pass before the checkpoint's weights are applied to it."""
    directory = find_checkpoint(path)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    data = yaml.safe_load((directory / CONFIG).read_text())
    for section, key in _PATH_FIELDS:
        node = data[section] if section else data
        value = node.get(key)
        if isinstance(value, str) and not value.startswith(("/", "~", "$")) and (directory / value).exists():
            node[key] = str((directory / value).resolve())
    for override in overrides or []:
        _apply_override(data, override)
    try:
        config = AnyverseConfig.model_validate(data)
    except ValueError as err:
        raise validation_error(str(directory / CONFIG), err) from None
    expected = manifest["base"]
    return config, lambda actual: check_base(directory, expected, actual)


def check_base(directory: Path, expected: dict[str, Any], actual: dict[str, Any]) -> None:
    """Fail, naming each difference, when a checkpoint is loaded onto a base model it was not trained on."""
    diffs = [f"{key}: checkpoint has {expected[key]!r}, this model has {actual.get(key)!r}"
             for key in sorted(expected) if expected[key] != actual.get(key)]
    if diffs:
        raise ValueError(f"{directory}: checkpoint does not fit this base model ({'; '.join(diffs)})")


# ---------------------------------------------------------------- resume state


def save_state(directory: Path, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
               extra: dict[str, Any]) -> None:
    """Optimizer tensors as safetensors, scalars/param groups/scheduler/step as JSON, RNG state as a tensor."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(directory / "optimizer.safetensors"))
    meta = {"step": step, "param_groups": state["param_groups"], "scalars": scalars,
            "scheduler": scheduler.state_dict(), **extra}
    (directory / "trainer.json").write_text(json.dumps(meta, indent=2))


def load_state(directory: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore what :func:`save_state` wrote; returns the trainer metadata (step, data position...)."""
    meta = json.loads((directory / "trainer.json").read_text())
    tensors = load_file(str(directory / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    slots: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return meta
