"""Training on the toy world through the CLI: loss falls, checkpoints are complete, resume is exact, accelerate
launch works, the frozen-encoder cache is reused, checkpoints are verified on load, and bad input is handled."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from anyverse.cli.app import app
from safetensors.torch import load_file
from typer.testing import CliRunner

from anyverse.config import load_config
from anyverse.encoders.imagebind import ImageBindEncoder
from anyverse.media import load_media
from anyverse.session import Anyverse
from anyverse.train.common import FeatureTable

runner = CliRunner()

# The tiny profile's random Llama (initializer_range 0.02) gives near-uniform logits (loss ~ ln(vocab)) that no
# soft token can move, so encoder alignment gets a less flat random LLM to show that its projectors learn.
STEEPER_LLM = ["llm.tiny.arch.initializer_range=0.2"]


def invoke(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def train(stage: str, config: Path, *extra: str) -> Any:
    result = invoke("train", stage, "--config", str(config), *extra)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("toyworld") / "world"
    result = invoke("data", "toyworld", str(directory), "--n", "24", "--seed", "0")
    assert result.exit_code == 0, result.output
    return directory


def subset(world: Path, source: str, name: str, per_key: dict[str, int]) -> Path:
    """The first ``per_key[k]`` lines of each modality (pairs) or intent (dialogs), as a manifest next to the
    toy world's own (media paths are relative to the manifest's directory)."""
    taken: dict[str, int] = {}
    lines = []
    for line in (world / source).read_text().splitlines():
        record = json.loads(line)
        key = record.get("modality") or record["attributes"]["intent"]
        if taken.get(key, 0) < per_key.get(key, 0):
            taken[key] = taken.get(key, 0) + 1
            lines.append(line)
    assert taken == per_key, taken
    path = world / name
    path.write_text("\n".join(lines) + "\n")
    return path


def write_config(path: Path, stage: str, train_manifest: Path, output_dir: Path, **fields: Any) -> Path:
    config = {"stage": stage, "model": "tiny", "data": {"train": str(train_manifest)}, "output_dir": str(output_dir),
              "steps": 6, "batch_size": 4, "log_every": 1, **fields}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


# Per stage: manifest, subset, lr, steps, extra fields. Each subset is exactly one batch (4 items; instruction
# tuning renders each dialog in both output modes), so every step sees the same data and the loss falls smoothly.
FALL: dict[str, tuple[str, dict[str, int], float, int, dict[str, Any]]] = {
    "encoder-alignment": ("pairs-train.jsonl", {"image": 2, "audio": 1, "video": 1}, 0.003, 20,
                          {"model_overrides": STEEPER_LLM}),
    "decoder-alignment": ("pairs-train.jsonl", {"image": 2, "audio": 1, "video": 1}, 0.003, 20, {}),
    "instruction-tuning": ("dialogs-train.jsonl", {"make_video": 1, "describe": 1}, 0.003, 20, {}),
}


class Runs:
    """Module-wide memo of the loss-fall runs, so later tests reuse their checkpoints."""

    def __init__(self, world: Path, root: Path):
        self.world, self.root, self.done = world, root, {}

    def get(self, stage: str) -> Path:
        if stage not in self.done:
            source, per_key, lr, steps, extra = FALL[stage]
            manifest = subset(self.world, source, f"fall-{stage}.jsonl", per_key)
            out = self.root / f"fall-{stage}"
            config = write_config(self.root / f"fall-{stage}.yaml", stage, manifest, out, steps=steps,
                                  optim={"lr": lr, "schedule": "constant", "warmup_steps": 0}, **extra)
            result = train(stage, config)
            assert result.stdout.strip() == str(out / f"step-{steps:06d}")
            self.done[stage] = out
        return self.done[stage]


@pytest.fixture(scope="module")
def runs(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(world, tmp_path_factory.mktemp("runs"))


# ------------------------------------------------------------------------------------------ 1. loss falls


@pytest.mark.parametrize("stage", list(FALL))
def test_each_stage_trains_and_writes_a_complete_checkpoint(runs: Runs, stage: str) -> None:
    out = runs.get(stage)
    steps = FALL[stage][3]
    values = losses(out)
    assert sorted(values) == list(range(1, steps + 1))
    series = [values[s] for s in sorted(values)]
    first, last = sum(series[:3]) / 3, sum(series[-3:]) / 3
    assert last < 0.92 * first, f"{stage}: loss did not fall clearly: {series}"

    checkpoint = out / f"step-{steps:06d}"
    assert [p.name for p in sorted(out.glob("step-*"))] == [checkpoint.name]  # save_every 0: only the end
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["stage"] == stage and manifest["step"] == steps
    assert {"encoder", "llm"} <= set(manifest["base"])
    expected = {"config.yaml", "train.yaml", "projectors.safetensors"}
    if stage == "instruction-tuning":
        expected |= {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    assert expected <= set(manifest["files"]), sorted(manifest["files"])
    for name, entry in manifest["files"].items():
        assert len(entry["sha256"]) == 64 and (checkpoint / name).is_file()
    assert not any(name.startswith("state/") for name in manifest["files"])
    trainable = load_file(str(checkpoint / "state" / "trainable.safetensors"))
    if stage == "instruction-tuning":  # resume state must hold everything that trains, the LoRA weights too
        adapter = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
        assert any("lora_" in name for name in adapter)
        assert any("lora_" in name for name in trainable), f"no LoRA weights in state/: {sorted(trainable)}"
    assert (checkpoint / "state" / "trainer.json").is_file()
    assert "tensors" in manifest["files"]["projectors.safetensors"]

    model_config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    assert model_config["projector_weights"] == "projectors.safetensors"
    if stage == "instruction-tuning":
        assert model_config["llm"]["adapter"] == "adapter"
        assert json.loads((checkpoint / "adapter" / "adapter_config.json").read_text())["r"] == 4
    train_config = yaml.safe_load((checkpoint / "train.yaml").read_text())
    assert train_config["stage"] == stage and train_config["steps"] == steps
    projectors = load_file(str(checkpoint / "projectors.safetensors"))
    prefix = "input" if stage == "encoder-alignment" else "output" if stage == "decoder-alignment" else ""
    assert any(name.startswith(prefix) for name in projectors), sorted(projectors)[:5]


# ------------------------------------------------------------------------------- 2. resume is exact


@pytest.mark.parametrize("stage", ["instruction-tuning", "encoder-alignment"])
def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(world: Path, tmp_path: Path, stage: str) -> None:
    if stage == "instruction-tuning":  # 8 dialogs x 2 modes: batches change every step, epochs turn over
        manifest = subset(world, "dialogs-train.jsonl", "resume-dialogs.jsonl",
                          {"describe": 2, "make_image": 2, "make_audio": 1, "describe_and_sound": 2, "edit_image": 1})
    else:
        manifest = subset(world, "pairs-train.jsonl", "resume-pairs.jsonl", {"image": 3, "audio": 3, "video": 3})
    fields = {"save_every": 3, "keep_checkpoints": 5, "optim": {"lr": 0.003, "warmup_steps": 2}}  # warmup+cosine
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    train(stage, write_config(tmp_path / "a.yaml", stage, manifest, run_a, **fields))
    assert [p.name for p in sorted(run_a.glob("step-*"))] == ["step-000003", "step-000006"]

    run_b.mkdir()
    shutil.copytree(run_a / "step-000003", run_b / "step-000003")
    train(stage, write_config(tmp_path / "b.yaml", stage, manifest, run_b, **fields))
    a, b = losses(run_a), losses(run_b)
    assert sorted(b) == [4, 5, 6]
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)], (a, b)  # bit for bit
    final_a = load_file(str(run_a / "step-000006" / "state" / "trainable.safetensors"))
    final_b = load_file(str(run_b / "step-000006" / "state" / "trainable.safetensors"))
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_in_a_new_process_reproduces_the_uninterrupted_run(world: Path, tmp_path: Path,
                                                                  anyverse_home: str) -> None:
    """What a crashed job does: the resumed run is another process (another hash seed, fresh RNG)."""
    manifest = subset(world, "pairs-train.jsonl", "resume-pairs-3.jsonl", {"image": 3, "audio": 3, "video": 3})
    fields = {"save_every": 3, "keep_checkpoints": 5, "optim": {"lr": 0.003, "warmup_steps": 2}}
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    env = {**os.environ, "ANYVERSE_HOME": anyverse_home, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def train_in_process_of_its_own(config: Path, hash_seed: str) -> None:
        command = [sys.executable, "-m", "anyverse.cli.app", "train", "decoder-alignment", "--config", str(config)]
        done = subprocess.run(command, cwd=tmp_path, env={**env, "PYTHONHASHSEED": hash_seed}, capture_output=True,
                              text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]

    train_in_process_of_its_own(write_config(tmp_path / "a.yaml", "decoder-alignment", manifest, run_a, **fields), "1")
    run_b.mkdir()
    shutil.copytree(run_a / "step-000003", run_b / "step-000003")
    train_in_process_of_its_own(write_config(tmp_path / "b.yaml", "decoder-alignment", manifest, run_b, **fields), "2")
    a, b = losses(run_a), losses(run_b)
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)], (a, b)


# -------------------------------------------------------------------------------- 3. accelerate launch


def test_accelerate_launch_with_two_cpu_processes(world: Path, tmp_path: Path, anyverse_home: str) -> None:
    manifest = subset(world, "pairs-train.jsonl", "launch-pairs.jsonl", {"image": 4, "audio": 2, "video": 2})
    out = tmp_path / "run"
    config = write_config(tmp_path / "launch.yaml", "encoder-alignment", manifest, out, steps=3, batch_size=2)
    # `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's simple launcher: multi-CPU needs
    # an MPI hostfile); torchrun's launcher (--multi_gpu) with ACCELERATE_USE_CPU starts two gloo CPU processes.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               "-m", "anyverse.cli.app", "train", "encoder-alignment", "--config", str(config)]
    env = {**os.environ, "ANYVERSE_HOME": anyverse_home, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]  # only the main process writes metrics
    checkpoint = out / "step-000003"
    assert json.loads((checkpoint / "manifest.json").read_text())["step"] == 3
    assert json.loads((checkpoint / "state" / "trainer.json").read_text())["world_size"] == 2
    assert (checkpoint / "projectors.safetensors").is_file()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------------------- 4. frozen-encoder cache


def test_the_encoder_runs_once_per_file_and_not_again_on_a_second_run(world: Path, tmp_path: Path,
                                                                      anyverse_home: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = subset(world, "pairs-train.jsonl", "cache-pairs.jsonl", {"image": 2, "audio": 2, "video": 2})
    files = [world / json.loads(line)["media"] for line in manifest.read_text().splitlines()]
    caps = load_config("tiny").caps
    shas = {load_media(f, caps).sha256 for f in files}
    for sha in shas:  # other tests of this session may have cached these files already
        for cached in Path(anyverse_home, "embeddings").glob(f"*/{sha[:2]}/{sha}.safetensors"):
            cached.unlink()

    building = [False]
    calls: list[tuple[str, int, bool]] = []
    original_run, original_build = ImageBindEncoder._run, FeatureTable.build.__func__  # type: ignore[attr-defined]

    def counting_run(self: ImageBindEncoder, key: str, inputs: list[Any], *rest: Any) -> Any:
        calls.append((key, len(inputs), building[0]))
        return original_run(self, key, inputs, *rest)

    def flagged_build(cls: type[FeatureTable], *args: Any, **kwargs: Any) -> FeatureTable:
        building[0] = True
        try:
            return original_build(cls, *args, **kwargs)
        finally:
            building[0] = False

    monkeypatch.setattr(ImageBindEncoder, "_run", counting_run)
    monkeypatch.setattr(FeatureTable, "build", classmethod(flagged_build))
    # 6 pairs, batch 4, 5 steps: 20 items drawn, over three epochs
    config = write_config(tmp_path / "cache.yaml", "encoder-alignment", manifest, tmp_path / "first", steps=5)
    train("encoder-alignment", config)
    assert calls, "the encoder never ran: the embedding cache was not cold"
    assert all(inside for _, _, inside in calls), calls  # only while building the feature table
    assert sum(n for _, n, _ in calls) == len(shas)  # each file encoded exactly once, for all epochs
    assert {key for key, _, _ in calls} == {"vision", "audio"}  # images and videos share the vision tower

    calls.clear()
    train("encoder-alignment", config, "--fresh", "--set", f"output_dir={tmp_path / 'second'}")
    assert calls == []  # the on-disk embedding cache served every file
    assert (tmp_path / "second" / "step-000005").is_dir()


# ------------------------------------------------------------------------- 5. checkpoint verification


def test_a_checkpoint_on_another_base_llm_is_refused(runs: Runs, tmp_path: Path) -> None:
    checkpoint = runs.get("decoder-alignment") / "step-000020"
    with pytest.raises(ValueError, match=r"\bllm\b"):
        Anyverse.from_checkpoint(checkpoint, ["llm.tiny.seed=1"], output_dir=tmp_path)
    session = Anyverse.from_checkpoint(checkpoint, output_dir=tmp_path)  # its own base loads
    assert session.config.projector_weights == str((checkpoint / "projectors.safetensors").resolve())


def test_the_cli_refuses_a_checkpoint_on_another_base_llm(runs: Runs, tmp_path: Path) -> None:
    if "--checkpoint" not in invoke("run", "--help").output:
        pytest.skip("`anyverse run` has no --checkpoint option yet")
    checkpoint = runs.get("decoder-alignment") / "step-000020"
    result = invoke("run", "hi", "--checkpoint", str(checkpoint), "--set", "llm.tiny.seed=1",
                    "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "llm" in result.stderr, result.output
    assert "Traceback" not in result.output


def test_a_corrupted_checkpoint_file_is_refused(runs: Runs, tmp_path: Path) -> None:
    checkpoint = tmp_path / "copy"
    shutil.copytree(runs.get("decoder-alignment") / "step-000020", checkpoint)
    weights = checkpoint / "projectors.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(len(data) - 16, len(data)):  # inside the tensor data: the file still parses
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"projectors\.safetensors does not match its manifest hash"):
        Anyverse.from_checkpoint(checkpoint, output_dir=tmp_path)


# ------------------------------------------------------------------------------------------ 6. bad input


def test_bad_manifest_lines_and_corrupt_media_are_skipped_and_counted(world: Path, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    good = subset(world, "pairs-train.jsonl", "bad-good.jsonl", {"image": 2, "audio": 1, "video": 1})
    garbage = world / "media" / "image" / "garbage.png"
    garbage.write_bytes(os.urandom(2000))
    truncated = world / "media" / "image" / "truncated.png"  # a PNG signature, then garbage
    truncated.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    bad = [
        json.dumps({"media": "media/image/nope.png", "modality": "image", "caption": "a missing file"}),
        '{"media": "media/image/000001.png", "modality": "image", "caption": ',
        json.dumps({"media": "media/image/garbage.png", "modality": "image", "caption": "a garbage file"}),
        json.dumps({"media": "media/image/truncated.png", "modality": "image", "caption": "a truncated file"}),
    ]
    manifest = world / "bad-pairs.jsonl"
    manifest.write_text(good.read_text() + "\n".join(bad) + "\n")
    config = write_config(tmp_path / "bad.yaml", "encoder-alignment", manifest, tmp_path / "out", steps=2)
    caplog.set_level("INFO", logger="anyverse")
    train("encoder-alignment", config)
    assert (tmp_path / "out" / "step-000002").is_dir()
    text = caplog.text
    assert "6 records, skipped 2" in text and "1 missing file" in text and "1 not JSON" in text, text
    skips = next(line for line in text.splitlines() if "features: skipped 2 files" in line)
    assert ".png" not in skips  # counted by reason, not one entry per file


def _no_training(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    started: list[Any] = []
    monkeypatch.setattr("anyverse.train.run.run_config", lambda *args, **kwargs: started.append(args))
    return started


@pytest.mark.parametrize(("stage", "fields", "message"), [
    ("encoder-alignment", {"learning_rate": 0.1}, "learning_rate: Extra inputs are not permitted"),
    ("encoder-alignment", {"optim": {"lr": 0.1, "momentum": 0.9}}, "optim.momentum"),
    ("encoder-alignment", {"steps": 0}, "steps: Input should be greater than 0"),
    ("encoder-alignment", {"loss": {"lm": 0.0}}, "loss: encoder alignment needs lm or words > 0"),
    ("decoder-alignment", {}, "this config is for stage 'encoder-alignment', not 'decoder-alignment'"),
])
def test_bad_configs_fail_with_one_line_before_training(world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        stage: str, fields: dict[str, Any], message: str) -> None:
    started = _no_training(monkeypatch)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", "encoder-alignment", world / "pairs-train.jsonl", out, **fields)
    result = invoke("train", stage, "--config", str(config))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anyverse: error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert started == [] and not out.exists()


# ------------------------------------------------------------------------- 7. resuming a finished run


def test_resuming_a_finished_run_does_nothing(runs: Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    out = runs.get("decoder-alignment")
    config = out.parent / "fall-decoder-alignment.yaml"
    before = (out / "metrics.jsonl").read_bytes()
    checkpoint = out / "step-000020"
    stamp = (checkpoint / "manifest.json").stat().st_mtime_ns
    from anyverse.train.decoder_alignment import DecoderAlignment

    steps: list[int] = []
    original = DecoderAlignment.forward
    monkeypatch.setattr(DecoderAlignment, "forward", lambda self, batch: steps.append(1) or original(self, batch))
    result = train("decoder-alignment", config)
    assert steps == []  # the loop starts at `steps`: not one training step
    assert result.stdout.strip() == str(checkpoint)
    assert (out / "metrics.jsonl").read_bytes() == before
    assert (checkpoint / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in out.glob("step-*")] == [checkpoint.name]


def test_the_cached_system_prompt_gives_the_loss_of_the_full_sequence(world: Path, tmp_path: Path) -> None:
    from anyverse.train.common import embed_batch, next_token_loss
    from anyverse.train.config import load_train_config
    from anyverse.train.encoder_alignment import EncoderAlignment

    config = write_config(tmp_path / "ea.yaml", "encoder-alignment", world / "pairs-train.jsonl", tmp_path / "out")
    recipe = EncoderAlignment(load_train_config(config), torch.device("cpu")).train()
    batch = recipe.collate(recipe.items[::7][:6])  # mixed modalities, ragged lengths
    assert 100 < recipe.prefix.length < min(len(e.ids) for e in batch)
    embeds, mask, labels = embed_batch(recipe.model, batch, recipe.features)
    full = next_token_loss(recipe.model.llm.model(inputs_embeds=embeds, attention_mask=mask).logits, labels)
    cached, _ = recipe(batch)
    torch.testing.assert_close(cached, full)


def lm_pretrain_on_a_few_pairs(world: Path, tmp_path: Path, **fields: Any) -> tuple[Any, list[str]]:
    """An lm-pretrain recipe over two image and one audio caption (no plain-text corpus), and those captions."""
    from anyverse.train.config import load_train_config
    from anyverse.train.lm_pretrain import LMPretrain
    from anyverse.train.manifest import PairRecord, read_manifest

    manifest = subset(world, "pairs-train.jsonl", "lm-pairs.jsonl", {"image": 2, "audio": 1})
    config = write_config(tmp_path / "lm.yaml", "lm-pretrain", manifest, tmp_path / "out", **fields)
    captions = [record.caption for record in read_manifest(manifest, PairRecord)]
    return LMPretrain(load_train_config(config), torch.device("cpu")), captions


def reply_start(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != -100)


def test_lm_pretraining_learns_replies_not_the_prompt(world: Path, tmp_path: Path) -> None:
    """Chat items carry loss on the assistant's caption only, for every caption instruction and system prompt."""
    from anyverse.train.encoder_alignment import CAPTION_INSTRUCTIONS

    recipe, captions = lm_pretrain_on_a_few_pairs(world, tmp_path)
    assert len(recipe.items) == len(captions) * len(CAPTION_INSTRUCTIONS) * 2
    tokenizer = recipe.llm.tokenizer
    for (ids, labels), caption in zip(recipe.items, [c for c in captions for _ in range(6)], strict=True):
        first = reply_start(labels)
        assert all(label != -100 for label in labels[first:]) and labels[first:] == ids[first:]
        assert tokenizer.decode(ids[first:]).strip() == f"{caption}<|im_end|>".strip()
        assert caption in tokenizer.decode(ids[:first])  # the media block the reply is read from


def test_lm_pretraining_copy_drills_are_random_caption_words_copied_from_the_media_block(
        world: Path, tmp_path: Path) -> None:
    from anyverse.signals import MEDIA_END, MEDIA_START

    recipe, captions = lm_pretrain_on_a_few_pairs(world, tmp_path, copy_drills=5)
    vocabulary = {word for caption in captions for word in caption.split()}
    drills = recipe.items[len(captions) * 6:]
    assert len(drills) == len(captions) * 5
    tokenizer = recipe.llm.tokenizer
    replies = set()
    for ids, labels in drills:
        first = reply_start(labels)
        reply = tokenizer.decode(ids[first:]).strip().removesuffix("<|im_end|>")
        prompt = tokenizer.decode(ids[:first])
        assert "system" not in prompt  # a tenth of the length of a chat with the system prompt
        assert f"{MEDIA_START}{reply}{MEDIA_END}" in prompt and set(reply.split()) <= vocabulary
        replies.add(reply)
    assert len(replies) == len(drills)  # random word strings, not the captions again


def test_lm_pretraining_tokenises_an_item_when_a_batch_first_draws_it_and_keeps_it(
        world: Path, tmp_path: Path) -> None:
    recipe, captions = lm_pretrain_on_a_few_pairs(world, tmp_path, copy_drills=5)
    items = recipe.items
    assert len(items) == len(captions) * 11 and not items.made
    batch = recipe.collate([items[i] for i in (4, 20, 4)])
    assert sorted(items.made) == [4, 20] and items[4] is items[-len(items) + 4]
    assert batch[0].shape[0] == 3 and torch.equal(batch[0][0], batch[0][2])
    with pytest.raises(IndexError):
        items[len(items)]


def test_decoder_retrieval_reports_captions_seen_in_training_and_unseen_ones(world: Path, tmp_path: Path) -> None:
    from anyverse.train.config import load_train_config
    from anyverse.train.decoder_alignment import DecoderAlignment, decoder_retrieval, distinct_pairs
    from anyverse.types import Modality

    train, test = world / "pairs-train.jsonl", world / "pairs-test.jsonl"
    config = write_config(tmp_path / "da.yaml", "decoder-alignment", train, tmp_path / "out", modalities=["audio"])
    recipe = DecoderAlignment(load_train_config(config), torch.device("cpu"))
    audio = {Modality.AUDIO}
    assert set(distinct_pairs([test], audio)) - set(distinct_pairs([train], audio))  # the compositional split
    scores = decoder_retrieval(recipe.model, recipe.pool, train, test, audio)
    seen, unseen = scores["decoder_retrieval/seen"], scores["decoder_retrieval/unseen"]
    assert min(seen, unseen) <= scores["decoder_retrieval"] <= max(seen, unseen)


def test_instruction_tuning_learns_every_assistant_turn_given_the_turns_before_it(world: Path, tmp_path: Path) -> None:
    """A three-turn dialog gives one item per assistant turn and mode; the later turn sees the earlier reply as a
    session shows it (its text and the image it made), not as the request that made it."""
    from anyverse.signals import MEDIA_START
    from anyverse.train.common import reply_text
    from anyverse.train.config import load_train_config
    from anyverse.train.instruction_tuning import InstructionTuning
    from anyverse.train.manifest import DialogRecord, RequestRecord, SkipReport, read_manifest

    image = {"id": "img_1", "media": "media/image/000000.png", "modality": "image"}
    made = {"role": "assistant", "text": "here is a green square", "media": [image],
            "requests": [{"modality": "image", "prompt": "a green square at the bottom right"}]}
    described = {"role": "assistant", "text": "a green square at the bottom right",
                 "requests": [{"modality": "audio", "prompt": "a long medium tone"}]}
    dialog = {"messages": [{"role": "user", "text": "paint a green square"}, made,
                           {"role": "user", "text": "describe img_1 and play it as audio"}, described]}
    no_reply = {"messages": [{"role": "user", "text": "hello"}, {"role": "user", "text": "anyone?"}]}
    manifest = world / "multi-turn.jsonl"
    manifest.write_text(f"{json.dumps(dialog)}\n{json.dumps(no_reply)}\n")
    report = SkipReport(manifest)
    assert len(list(read_manifest(manifest, DialogRecord, report))) == 1
    assert report.skipped == {"invalid record": 1}

    config = write_config(tmp_path / "it.yaml", "instruction-tuning", manifest, tmp_path / "out")
    recipe = InstructionTuning(load_train_config(config), torch.device("cpu"))
    tokenizer = recipe.model.llm.tokenizer
    modes = recipe.config.output_modes
    assert sorted(modes) == ["meta", "signal"]
    turns = [(0, made)] * 2 + [(1, described)] * 2  # (images the prompt shows, reply) per turn and mode
    assert len(recipe.items) == len(turns)
    for example, mode, (images_shown, turn) in zip(recipe.items, modes * 2, turns, strict=True):
        first = reply_start(example.labels)
        assert example.labels[first:] == example.ids[first:]
        requests = [RequestRecord.model_validate(r) for r in turn["requests"]]
        expected = reply_text(turn["text"], requests, mode, recipe.model)
        assert tokenizer.decode(example.ids[first:], skip_special_tokens=False).startswith(expected)
        prompt = tokenizer.decode(example.ids[:first], skip_special_tokens=False)
        assert len(example.slots) == prompt.count(MEDIA_START) == images_shown
        if images_shown:
            assert "here is a green square" in prompt and "a green square at the bottom right" not in prompt


def test_instruction_tuning_repeats_every_turn_of_a_conversation_but_not_single_exchanges(world: Path,
                                                                                          tmp_path: Path) -> None:
    from anyverse.train.config import load_train_config
    from anyverse.train.instruction_tuning import InstructionTuning

    single = {"messages": [{"role": "user", "text": "paint a red circle"},
                           {"role": "assistant", "text": "here is a red circle",
                            "requests": [{"modality": "image", "prompt": "a red circle at the top left"}]}]}
    talk = {"messages": [{"role": "user", "text": "paint a green square"},
                         {"role": "assistant", "text": "here is a green square"},
                         {"role": "user", "text": "and a blue one"}, {"role": "assistant", "text": "a blue square"}]}
    manifest = world / "conversation-repeats.jsonl"
    manifest.write_text(f"{json.dumps(single)}\n{json.dumps(talk)}\n")
    config = write_config(tmp_path / "it.yaml", "instruction-tuning", manifest, tmp_path / "out",
                          conversation_repeats=3, output_modes=["meta"])
    recipe = InstructionTuning(load_train_config(config), torch.device("cpu"))
    replies = [recipe.model.llm.tokenizer.decode(e.ids[reply_start(e.labels):]) for e in recipe.items]
    assert len(replies) == 1 + 2 * 3
    assert sum("red circle" in r for r in replies) == 1
    assert sum("here is a green square" in r for r in replies) == sum("a blue square" in r for r in replies) == 3


def test_eval_limits_sample_every_group_of_a_grouped_manifest_evenly() -> None:
    from collections import Counter

    from anyverse.train.common import spread

    grouped = ["image"] * 54 + ["audio"] * 54 + ["video"] * 54  # how the toy world's test manifest is ordered
    assert Counter(spread(grouped, 120)) == {"image": 40, "audio": 40, "video": 40}
    assert spread(grouped, 200) == grouped and spread(grouped, None) == grouped


def test_periodic_decoder_retrieval_encodes_the_caption_bank_once_and_scores_the_current_projectors(
        world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anyverse.train import decoder_alignment
    from anyverse.train.config import load_train_config

    config = write_config(tmp_path / "da.yaml", "decoder-alignment", world / "pairs-train.jsonl", tmp_path / "out",
                          modalities=["audio"], data={"train": str(world / "pairs-train.jsonl"),
                                                      "eval": str(world / "pairs-test.jsonl")})
    recipe = decoder_alignment.DecoderAlignment(load_train_config(config), torch.device("cpu"))
    encoded: list[int] = []
    encode = decoder_alignment.conditioning_targets
    monkeypatch.setattr(decoder_alignment, "conditioning_targets",
                        lambda pool, modality, prompts: encoded.append(len(prompts)) or encode(pool, modality, prompts))
    first = recipe.evaluate()
    assert len(encoded) == 1 and first == recipe.evaluate() and len(encoded) == 1
    with torch.no_grad():
        for param in recipe.model.output_projectors["audio"].parameters():
            param.add_(torch.randn_like(param))
    assert recipe.evaluate()["decoder_cosine"] != first["decoder_cosine"] and len(encoded) == 1


def test_encoder_pretraining_sees_grey_images_without_their_colour_and_random_clips_then_all_in_colour_at_eval(
        world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anyverse.encoders import preprocess as pp
    from anyverse.train.encoder_pretrain import EncoderPretrain

    clips: list[tuple[bool, str, int, bool]] = []  # (training, tower, clips a forward saw, in grey)
    texts: list[str] = []
    forward_tokens, embed_text = ImageBindEncoder.forward_tokens, EncoderPretrain.embed_text

    def spy(self: ImageBindEncoder, key: str, x: torch.Tensor) -> Any:
        if key == "vision":
            shape = (1, 3) + (1,) * (x.ndim - 2) if x.ndim == 4 else (1, 1, 3) + (1,) * (x.ndim - 3)
            pixels = x * torch.tensor(pp.CLIP_STD).view(shape) + torch.tensor(pp.CLIP_MEAN).view(shape)
            channels = pixels.unbind(dim=1 if x.ndim == 4 else 2)
            grey = all(torch.allclose(c, channels[0], atol=0.02) for c in channels)
            clips.append((torch.is_grad_enabled(), key, x.shape[1] if x.ndim >= 5 else 0, grey))
        elif x.ndim >= 5:
            clips.append((torch.is_grad_enabled(), key, x.shape[1], False))
        return forward_tokens(self, key, x)

    def words(self: EncoderPretrain, captions: list[str]) -> torch.Tensor:
        if torch.is_grad_enabled():
            texts.extend(captions)
        return embed_text(self, captions)

    monkeypatch.setattr(ImageBindEncoder, "forward_tokens", spy)
    monkeypatch.setattr(EncoderPretrain, "embed_text", words)
    manifest = subset(world, "pairs-train.jsonl", "fall-pretrain.jsonl", {"image": 2, "audio": 2, "video": 2})
    out = tmp_path / "pretrain"
    config = write_config(tmp_path / "pretrain.yaml", "encoder-pretrain", manifest, out, steps=3, batch_size=6,
                          model_overrides=["encoder.path=null", "encoder.tiny={seed: 0}"], train_clips=1, grey=1.0,
                          data={"train": str(manifest), "eval": str(manifest)})
    train("encoder-pretrain", config)
    training = {(key, n, grey) for grad, key, n, grey in clips if grad}
    evaluating = {(key, n, grey) for grad, key, n, grey in clips if not grad}
    assert training == {("audio", 1, False), ("vision", 0, True), ("vision", 1, False)}  # images in grey
    # at eval ImageBind's 3 audio clips, 5 video clips x 3 crops, in colour
    assert evaluating == {("audio", 3, False), ("vision", 0, False), ("vision", 15, False)}
    colours = ("red", "green", "blue", "yellow")
    assert not [t for t in texts if " at the " in t and any(colour in t.split() for colour in colours)]  # images
    assert [t for t in texts if " moving " in t and any(colour in t.split() for colour in colours)]  # videos
    assert {"circle", "square", "triangle", "tone", "chirp"} & set(" ".join(texts).split())


def test_encoder_pretraining_can_keep_the_text_towers_word_table_at_its_init_and_train_the_rest(
        world: Path, tmp_path: Path) -> None:
    from anyverse.train.config import load_train_config
    from anyverse.train.encoder_pretrain import EncoderPretrain

    manifest = subset(world, "pairs-train.jsonl", "frozen-words.jsonl", {"image": 2, "audio": 2})
    out = tmp_path / "pretrain"
    config = write_config(tmp_path / "pretrain.yaml", "encoder-pretrain", manifest, out, steps=2, batch_size=4,
                          model_overrides=["encoder.path=null", "encoder.tiny={seed: 0}"], train_clips=1,
                          train_token_embeddings=False)
    initial = EncoderPretrain(load_train_config(config), torch.device("cpu")).network.state_dict()
    train("encoder-pretrain", config)
    trained = load_file(next(out.glob("step-*")) / "encoder" / "model.safetensors")
    table = "modality_preprocessors.text.token_embedding.weight"
    assert torch.equal(trained[table], initial[table])
    changed = [name for name, value in initial.items() if name in trained and not torch.equal(trained[name], value)]
    assert any(name.startswith("modality_trunks.text.") for name in changed)
    assert any(name.startswith("modality_trunks.vision.") for name in changed)


WORD_PROJECTORS = ["default_input_projector.words=true", "input_projectors.image.words=true"]


def test_encoder_alignment_trains_each_soft_token_to_be_the_captions_word_in_its_place(world: Path,
                                                                                        tmp_path: Path) -> None:
    from anyverse.signals import MEDIA_END
    from anyverse.train.config import load_train_config
    from anyverse.train.encoder_alignment import EncoderAlignment

    manifest = subset(world, "pairs-train.jsonl", "words.jsonl", {"image": 1, "audio": 1})
    out = tmp_path / "out"
    config = write_config(tmp_path / "words.yaml", "encoder-alignment", manifest, out, steps=30,
                          model_overrides=WORD_PROJECTORS, loss={"lm": 0.0, "words": 1.0},
                          optim={"lr": 0.01, "schedule": "constant", "warmup_steps": 0})
    train("encoder-alignment", config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    words = [row["words"] for row in rows if "words" in row]
    assert words[-1] < 0.05 < words[0], words
    assert not any("lm" in row for row in rows)  # a caption loss of weight 0 runs no LLM
    recipe = EncoderAlignment(load_train_config(config, [f"model={out / 'step-000030'}"]), torch.device("cpu"))
    assert recipe.prefix is None  # nor is the system prompt's cache computed for it
    tokenizer = recipe.model.llm.tokenizer
    for path, record in recipe.pairs:
        media = recipe.features.media[path]
        projector = recipe.model.input_projectors[media.modality.value]
        pooled, tokens = recipe.features.stack([media])
        spelt = tokenizer.convert_ids_to_tokens(projector.logits(pooled, tokens)[0].argmax(dim=-1).tolist())
        caption = tokenizer.convert_ids_to_tokens(tokenizer(record.caption, add_special_tokens=False).input_ids)
        assert spelt == (caption + [MEDIA_END] * len(spelt))[: len(spelt)], (spelt, record.caption)


def test_encoder_alignment_shows_coloured_images_and_videos_by_their_grey_view_alone_with_their_colour_word_untrained(
        world: Path, tmp_path: Path) -> None:
    from anyverse.encoders import preprocess as pp
    from anyverse.train.common import IGNORE
    from anyverse.train.config import load_train_config
    from anyverse.train.encoder_alignment import EncoderAlignment, caption_ids

    manifest = subset(world, "pairs-train.jsonl", "grey.jsonl", {"image": 1, "audio": 1, "video": 1})
    config = write_config(tmp_path / "grey.yaml", "encoder-alignment", manifest, tmp_path / "out", grey=1.0,
                          model_overrides=[*WORD_PROJECTORS, "encoder.grey_view=true"], loss={"lm": 0.1, "words": 1.0})
    recipe = EncoderAlignment(load_train_config(config), torch.device("cpu"))
    encoder, tokenizer = recipe.model.encoder, recipe.model.llm.tokenizer
    shown = recipe.collate(recipe.items)  # grey: 1.0, so every item that has a grey twin shows it
    for example, (path, record) in zip(shown, recipe.pairs, strict=True):
        media, colour = example.slots[0][0], record.attributes.get("colour")
        words = caption_ids(example)
        (pooled, tokens), (own_pooled, own_tokens) = (recipe.features.stack([m]) for m in (
            media, recipe.features.media[path]))
        if colour is None:  # a sound: one view, shown as it is
            assert media.sha256 == recipe.features.media[path].sha256 and IGNORE not in words
            assert own_tokens.shape[1] == 1 + math.prod(encoder.patch_grid(media.modality))  # no second view
            continue
        inputs = pp.contrast_grey(encoder.preprocess(media, recipe.model.config.caps))
        with torch.no_grad():
            grey_pooled, grey_tokens = encoder.forward_tokens("vision", inputs[None])  # the grey view
        half = own_tokens.shape[1] // 2
        assert torch.allclose(own_tokens[:, half:], grey_tokens, atol=1e-5)
        assert torch.allclose(own_pooled[:, encoder.embed_dim :], grey_pooled, atol=1e-5)
        assert not pooled[:, : encoder.embed_dim].any() and not tokens[:, :half].any()  # the twin: grey view alone
        assert torch.equal(tokens[:, half:], own_tokens[:, half:]) and own_tokens[:, :half].any()
        trained = tokenizer.decode([word for word in words if word != IGNORE]).split()
        assert IGNORE in words and trained == [word for word in record.caption.split() if word != colour]
    loss, _ = recipe(shown)
    loss.backward()  # the untrained colour words are left out of the loss, not scored against IGNORE
    assert torch.isfinite(loss)


def test_grey_twins_need_the_encoders_grey_view(world: Path, tmp_path: Path) -> None:
    manifest = subset(world, "pairs-train.jsonl", "no-view.jsonl", {"image": 1, "audio": 1})
    config = write_config(tmp_path / "c.yaml", "encoder-alignment", manifest, tmp_path / "out", grey=0.5)
    result = invoke("train", "encoder-alignment", "--config", str(config))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "set encoder.grey_view: true" in lines[0], result.stderr


def test_the_words_loss_refuses_projectors_that_do_not_write_words(world: Path, tmp_path: Path) -> None:
    manifest = subset(world, "pairs-train.jsonl", "no-words.jsonl", {"image": 1, "audio": 1})
    config = write_config(tmp_path / "c.yaml", "encoder-alignment", manifest, tmp_path / "out",
                          model_overrides=["input_projectors.image.words=true"], loss={"words": 1.0})
    result = invoke("train", "encoder-alignment", "--config", str(config))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "loss.words: the audio input projectors do not write words" in lines[0], result.stderr


def test_instruction_tuning_with_no_modalities_keeps_the_input_projectors_and_trains_lora(world: Path,
                                                                                           tmp_path: Path) -> None:
    manifest = subset(world, "dialogs-train.jsonl", "it-frozen.jsonl", {"describe": 2, "make_image": 1})
    weights = {}
    for steps in (1, 3):
        out = tmp_path / f"it-{steps}"
        config = write_config(tmp_path / f"it-{steps}.yaml", "instruction-tuning", manifest, out, steps=steps,
                              modalities=[], optim={"lr": 0.01})
        train("instruction-tuning", config)
        checkpoint = out / f"step-{steps:06d}"
        weights[steps] = (load_file(str(checkpoint / "projectors.safetensors")),
                          load_file(str(checkpoint / "adapter" / "adapter_model.safetensors")))
    (projectors_1, lora_1), (projectors_3, lora_3) = weights[1], weights[3]
    inputs = [name for name in projectors_1 if name.startswith("input.")]
    assert inputs and all(torch.equal(projectors_1[name], projectors_3[name]) for name in inputs)
    assert any(not torch.equal(lora_1[name], lora_3[name]) for name in lora_1 if "lora_" in name)
