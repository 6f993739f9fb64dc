"""The optional denoising loss on the tiny profile: each built-in generator's ``denoising_loss`` trains only the
conditioning, decoder alignment logs it with ``loss.denoise > 0``, and a plugin without it is refused up front."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from anyverse.cli.app import app
from mock_generators import MockImage
from typer.testing import CliRunner

from anyverse.config import Caps, load_config
from anyverse.media import load_media
from anyverse.plugins import Denoiser, get_generator_class
from anyverse.train.toyworld import make_toyworld
from anyverse.types import Media, Modality

CPU = torch.device("cpu")
OUTPUTS = [Modality.IMAGE, Modality.VIDEO, Modality.AUDIO]
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("denoising") / "world"
    make_toyworld(directory, n=24, seed=0)
    return directory


@pytest.fixture(scope="module")
def pairs(world: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (world / "pairs-train.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def generators() -> dict[Modality, Any]:
    found = {}
    for modality, config in load_config("tiny").generators.items():
        generator = get_generator_class(config.plugin)(config, CPU, torch.float32)
        assert isinstance(generator, Denoiser)
        found[modality] = generator
    return found


def media_of(world: Path, pairs: list[dict[str, Any]], modality: Modality, count: int = 2) -> list[Media]:
    files = [world / p["media"] for p in pairs if p["modality"] == modality.value][:count]
    return [load_media(path, Caps()) for path in files]


def conditioning(generator: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    """``encode_prompts``' tensors, the float ones as leaves that collect gradients."""
    encoded = generator.encode_prompts(prompts)
    return {name: value.clone().requires_grad_(value.is_floating_point()) for name, value in encoded.items()}


def seeded_loss(generator: Any, cond: dict[str, torch.Tensor], media: list[Media], seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return generator.denoising_loss(cond, media)


@pytest.mark.parametrize("modality", OUTPUTS)
def test_denoising_loss_is_finite_and_trains_only_the_conditioning(world, pairs, generators, modality):
    generator = generators[modality]
    cond = conditioning(generator, ["a red circle", "a blue square"])
    loss = seeded_loss(generator, cond, media_of(world, pairs, modality))
    assert loss.shape == () and math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    floats = {name: value for name, value in cond.items() if value.is_floating_point()}
    assert floats and all(value.grad is not None and value.grad.abs().sum() > 0 for value in floats.values())
    pipe = generator.pipeline()
    frozen = [pipe.unet, pipe.vae]
    assert all(p.grad is None for module in frozen for p in module.parameters())


@pytest.mark.parametrize("modality", OUTPUTS)
def test_denoising_loss_depends_on_the_conditioning(world, pairs, generators, modality):
    generator = generators[modality]
    media = media_of(world, pairs, modality)
    with torch.no_grad():
        first, again = (seeded_loss(generator, conditioning(generator, ["a red circle", "a blue square"]), media)
                        for _ in range(2))
        other = seeded_loss(generator, conditioning(generator, ["a loud bang", "a green triangle"]), media)
    assert first.item() == again.item()
    assert other.item() != first.item()


def test_the_target_follows_the_schedulers_prediction_type(world, pairs, generators, monkeypatch):
    generator = generators[Modality.IMAGE]
    runtime = generator
    pipe = runtime.pipeline()
    media = media_of(world, pairs, Modality.IMAGE)
    losses = {}
    for kind in ("epsilon", "v_prediction", "sample", "flow"):
        monkeypatch.setattr(pipe, "scheduler", type(pipe.scheduler).from_config(pipe.scheduler.config,
                                                                               prediction_type=kind))
        monkeypatch.setattr(runtime, "_noise_scheduler", None)
        with torch.no_grad():
            if kind == "flow":
                with pytest.raises(ValueError, match="cannot train against prediction_type 'flow'"):
                    seeded_loss(generator, conditioning(generator, ["a", "b"]), media)
            else:
                losses[kind] = seeded_loss(generator, conditioning(generator, ["a", "b"]), media).item()
    assert len(set(losses.values())) == 3, losses


def test_denoising_loss_needs_one_conditioning_row_per_media_item(world, pairs, generators):
    generator = generators[Modality.IMAGE]
    with pytest.raises(ValueError, match="one row per media item"):
        generator.denoising_loss(conditioning(generator, ["one prompt"]), media_of(world, pairs, Modality.IMAGE))


# ---------------------------------------------------------------- decoder alignment


def manifest(world: Path, pairs: list[dict[str, Any]], name: str, per_modality: dict[str, int],
             extra: tuple[dict[str, Any], ...] = ()) -> Path:
    """The first ``per_modality[m]`` toy-world pairs of each modality, then ``extra`` lines."""
    taken: dict[str, int] = {}
    lines = []
    for pair in pairs:
        modality = pair["modality"]
        if taken.get(modality, 0) < per_modality.get(modality, 0):
            taken[modality] = taken.get(modality, 0) + 1
            lines.append(json.dumps(pair))
    path = world / name
    path.write_text("\n".join([*lines, *map(json.dumps, extra)]) + "\n")
    return path


def write_config(path: Path, train: Path, out: Path, **fields: Any) -> Path:
    config = {"stage": "decoder-alignment", "model": "tiny", "data": {"train": str(train)}, "output_dir": str(out),
              "steps": 3, "batch_size": 5, "log_every": 1, **fields}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_decoder_alignment_with_denoise_logs_denoise_loss(world, pairs, tmp_path, caplog):
    garbage = world / "media" / "image" / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    unreadable = {"media": "media/image/garbage.png", "modality": "image", "caption": "an unreadable picture"}
    train = manifest(world, pairs, "denoise.jsonl", {"image": 2, "video": 1, "audio": 1}, (unreadable,))
    out = tmp_path / "out"
    config = write_config(tmp_path / "denoise.yaml", train, out)
    caplog.set_level("WARNING", logger="anyverse")
    result = runner.invoke(app, ["train", "decoder-alignment", "--config", str(config), "--set", "loss.denoise=1.0"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    values = [row["denoise_loss"] for row in rows if "loss" in row]
    assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values), rows
    assert all(row["loss"] > row["denoise_loss"] for row in rows if "loss" in row)  # L2 is still in the total
    assert "denoising loss: skipping" in caplog.text and "garbage.png" in caplog.text, caplog.text
    assert yaml.safe_load((out / "step-000003" / "train.yaml").read_text())["loss"]["denoise"] == 1.0


def test_a_plugin_without_denoising_loss_fails_in_one_line_before_training(world, pairs, tmp_path, monkeypatch):
    from anyverse.train import decoder_alignment

    assert not hasattr(MockImage, "denoising_loss")  # registered as "mock-image"
    steps: list[int] = []
    monkeypatch.setattr(decoder_alignment, "signal_items", lambda *args: steps.append(1) or [])
    train = manifest(world, pairs, "images.jsonl", {"image": 2})
    out = tmp_path / "out"
    config = write_config(tmp_path / "mock.yaml", train, out, loss={"denoise": 0.5},
                          model_overrides=["generators.image.plugin=mock-image"])
    result = runner.invoke(app, ["train", "decoder-alignment", "--config", str(config)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == ["anyverse: error: generator plugin mock-image has no denoising_loss; set loss.denoise=0"]
    assert steps == [] and not (out / "metrics.jsonl").exists()
