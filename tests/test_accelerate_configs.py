"""The example accelerate configs (anyverse/train/configs/accelerate/) load with accelerate's own loader and
launcher, and the training loop's FSDP code path trains, checkpoints and resumes exactly on 2 CPU processes.

accelerate only shards on accelerators: with ACCELERATE_USE_CPU it quietly turns an FSDP config into gloo DDP. The
FSDP test therefore launches through ``accelerate launch --config_file fsdp.yaml`` (so the launcher turns the
shipped file into the FSDP_* variables) and a small driver that builds accelerate's FSDP plugin from those variables
and switches the process state to FSDP before the real ``anyverse train`` runs; torch's FSDP itself runs on
CPU/gloo. What a GPU run adds (bf16 mixed precision on NCCL, CPU offload of the gathered state) is not tested here.
"""

from __future__ import annotations

import json
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
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from anyverse.cli.app import app
from safetensors.torch import load_file
from typer.testing import CliRunner

CONFIGS = Path(__file__).resolve().parents[1] / "anyverse" / "train" / "configs" / "accelerate"
EXPECTED = {"fsdp.yaml": DistributedType.FSDP, "deepspeed-zero2.yaml": DistributedType.DEEPSPEED,
            "ddp-cpu.yaml": DistributedType.MULTI_GPU}


def test_the_shipped_configs_are_the_expected_ones() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerates_loader_and_says_how_to_launch_it(name: str) -> None:
    path = CONFIGS / name
    config = load_config_from_file(str(path))  # unknown keys raise here
    assert config.distributed_type == EXPECTED[name]
    comment = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert path.read_text().startswith("#")
    assert any(f"accelerate launch --config_file anyverse/train/configs/accelerate/{name}" in line
               for line in comment), comment
    assert not (set(yaml.safe_load(path.read_text())) - set(config.__dataclass_fields__))


def launcher_env(name: str, *extra: str) -> tuple[Any, dict[str, str]]:
    """What ``accelerate launch --config_file NAME ... script.py`` would put in each process's environment."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), *extra, "script.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_fsdp_config_gives_the_plugin_a_lora_run_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy, StateDictType
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    args, env = launcher_env("fsdp.yaml")
    assert args.use_fsdp and args.num_processes == 8 and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["FSDP_SYNC_MODULE_STATES"] == "true" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")  # true asks torch.cuda for the current device
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1 and plugin.use_orig_params is True
    assert plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert plugin.backward_prefetch == BackwardPrefetch.BACKWARD_PRE
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.cpu_ram_efficient_loading is False and plugin.cpu_offload.offload_params is False
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2))
    plugin.set_auto_wrap_policy(llm)  # raises when the layer class is not in the model
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {LlamaDecoderLayer}


def test_deepspeed_config_gives_zero2_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.utils import DeepSpeedPlugin

    args, env = launcher_env("deepspeed-zero2.yaml")
    assert args.use_deepspeed and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()  # builds without deepspeed installed
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
    config = plugin.deepspeed_config
    assert config["zero_optimization"]["stage"] == 2 and config["bf16"] == {"enabled": True}
    assert config["gradient_clipping"] == 1.0 and config["gradient_accumulation_steps"] == 1
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "none"


def test_ddp_cpu_config_is_what_the_cpu_launch_test_runs() -> None:
    args, env = launcher_env("ddp-cpu.yaml")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert (args.num_processes, args.num_machines, args.mixed_precision) == (2, 1, "no")
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


@pytest.fixture
def fresh_accelerate_state() -> Any:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_processes_that_would_each_train_alone_are_refused(monkeypatch: pytest.MonkeyPatch,
                                                            fresh_accelerate_state: None) -> None:
    """ddp-cpu.yaml without ACCELERATE_USE_CPU on a GPU-less host: torchrun starts 2 processes, accelerate sees 1."""
    from anyverse.config import ConfigError
    from anyverse.train.run import make_accelerator

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="ACCELERATE_USE_CPU=true"):
        make_accelerator()


def test_an_fsdp_config_accelerate_cannot_honour_is_reported(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture,
                                                             fresh_accelerate_state: None) -> None:
    from anyverse.train.run import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level("WARNING", logger="anyverse.train.run"):
        accelerator = make_accelerator()
    assert accelerator.distributed_type == DistributedType.NO
    assert "asks for FSDP" in caplog.text


# ------------------------------------------------------------------------------------ FSDP on 2 CPU processes

# `anyverse` with accelerate's FSDP state forced onto its CPU/gloo processes. The FSDP plugin comes from the FSDP_*
# variables `accelerate launch --config_file fsdp.yaml` set; device "cpu" (FSDP compares it with the parameters').
DRIVER = '''
import sys

import accelerate
import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


class FSDPOnCPU(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert self.distributed_type == DistributedType.MULTI_CPU, self.distributed_type
        plugin = FullyShardedDataParallelPlugin()
        for shared in (PartialState._shared_state, AcceleratorState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
            shared["device"] = torch.device("cpu")
        AcceleratorState._shared_state["fsdp_plugin"] = plugin


accelerate.Accelerator = FSDPOnCPU  # what anyverse.train.run.make_accelerator instantiates
from anyverse.cli.app import main

sys.argv[0] = "anyverse"
main()
'''


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def take(source: Path, target: Path, key: str, per_key: dict[str, int]) -> Path:
    taken: dict[str, int] = {}
    lines = []
    for line in source.read_text().splitlines():
        value = json.loads(line)["attributes"][key]
        if taken.get(value, 0) < per_key.get(value, 0):
            taken[value] = taken.get(value, 0) + 1
            lines.append(line)
    assert taken == per_key, taken
    target.write_text("\n".join(lines) + "\n")
    return target


def rows(run: Path) -> dict[int, dict[str, Any]]:
    merged: dict[int, dict[str, Any]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        merged.setdefault(row.pop("step"), {}).update(row)
    return merged


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_trains_checkpoints_evaluates_and_resumes_exactly(
        tmp_path: Path, anyverse_home: str) -> None:
    runner = CliRunner()
    world = tmp_path / "world"
    assert runner.invoke(app, ["data", "toyworld", str(world), "--n", "24", "--seed", "0"]).exit_code == 0
    train_manifest = take(world / "dialogs-train.jsonl", world / "fsdp-train.jsonl", "intent",
                          {"describe": 2, "make_image": 2, "make_audio": 1, "describe_and_sound": 2, "edit_image": 1})
    eval_manifest = take(world / "dialogs-test.jsonl", world / "fsdp-eval.jsonl", "intent",
                         {"describe": 1, "make_image": 1})

    def config(name: str, **fields: Any) -> Path:
        data = {"stage": "instruction-tuning", "model": "tiny", "output_dir": str(tmp_path / name),
                "data": {"train": str(train_manifest), "eval": str(eval_manifest)}, "steps": 4, "batch_size": 2,
                "log_every": 1, "save_every": 2, "eval_every": 2, "keep_checkpoints": 5,
                "optim": {"lr": 0.003, "warmup_steps": 2}, **fields}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    # tiny weights are built on first use: build them here, not in two processes at once
    warm = config("warm", steps=1, data={"train": str(train_manifest)})
    warm_run = runner.invoke(app, ["train", "instruction-tuning", "--config", str(warm)])
    assert warm_run.exit_code == 0, warm_run.output
    driver = tmp_path / "fsdp_on_cpu.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "ANYVERSE_HOME": anyverse_home, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "true"}
    launch = [sys.executable, "-m", "accelerate.commands.launch"]

    def fsdp(name: str) -> None:
        command = [*launch, "--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", "2",
                   "--mixed_precision", "no", "--fsdp_sync_module_states", "false",
                   "--main_process_port", str(free_port()), str(driver),
                   "train", "instruction-tuning", "--config", str(tmp_path / f"{name}.yaml")]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]

    config("a")
    fsdp("a")
    a = tmp_path / "a"
    assert sorted(p.name for p in a.glob("step-*")) == ["step-000002", "step-000004"]
    trainable = load_file(str(a / "step-000004" / "state" / "trainable.safetensors"))
    assert not any("_fsdp_wrapped_module" in name for name in trainable)
    lora = sorted(name for name in trainable if "lora_" in name)
    adapter = load_file(str(a / "step-000004" / "adapter" / "adapter_model.safetensors"))
    assert lora and len([name for name in adapter if "lora_" in name]) == len(lora)  # every LoRA tensor, whole
    some = lora[0]  # model.language_model.base_model.model.model.layers.0....lora_A.default.weight
    saved = some.split("language_model.", 1)[1].replace(".default", "")
    assert torch.equal(adapter[saved], trainable[some])
    manifest = json.loads((a / "step-000004" / "manifest.json").read_text())
    assert {"projectors.safetensors", "adapter/adapter_model.safetensors"} <= set(manifest["files"])

    # resume from step 2 in a fresh run directory: the same losses and the same final tensors, bit for bit
    shutil.copytree(a / "step-000002", tmp_path / "b" / "step-000002")
    config("b")
    fsdp("b")
    first, resumed = rows(a), rows(tmp_path / "b")
    assert sorted(resumed) == [3, 4]
    assert [resumed[s]["loss"] for s in (3, 4)] == [first[s]["loss"] for s in (3, 4)], (first, resumed)
    final_b = load_file(str(tmp_path / "b" / "step-000004" / "state" / "trainable.safetensors"))
    assert final_b.keys() == trainable.keys() and all(torch.equal(final_b[k], trainable[k]) for k in trainable)

    # the same two steps under DDP: the same losses and eval scores, the same checkpoint layout
    config("c", steps=2)
    command = [*launch, "--config_file", str(CONFIGS / "ddp-cpu.yaml"), "--main_process_port", str(free_port()),
               "-m", "anyverse.cli.app", "train", "instruction-tuning", "--config", str(tmp_path / "c.yaml")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ddp = rows(tmp_path / "c")
    for step in (1, 2):
        assert first[step]["loss"] == pytest.approx(ddp[step]["loss"], rel=1e-5), (first, ddp)
    evals = {k: v for k, v in first[2].items() if k.startswith("eval/")}
    assert evals and evals == {k: v for k, v in ddp[2].items() if k.startswith("eval/")}
    for name in ("state/trainable.safetensors", "state/optimizer.safetensors", "projectors.safetensors"):
        ours, theirs = load_file(str(a / "step-000002" / name)), load_file(str(tmp_path / "c" / "step-000002" / name))
        if name.endswith("optimizer.safetensors"):
            # FSDP gives trainable parameters that no process used a zero gradient (AdamW then steps them), where
            # DDP leaves them None (no AdamW state yet): FSDP's optimizer state is a superset of DDP's
            assert theirs.keys() <= ours.keys()
        else:
            assert ours.keys() == theirs.keys()
        assert all(ours[k].shape == theirs[k].shape for k in theirs)


# ------------------------------------------------------------------------ DeepSpeed ZeRO-2 on 2 CPU processes

# DeepSpeed is not an anyverse dependency: this runs where it is installed (DS_ACCELERATOR=cpu, ops not built). On a
# GPU-less host accelerate gives each process num_processes=1 under DeepSpeed; the driver restores the real ranks.
DEEPSPEED_DRIVER = '''
import os
import sys

import accelerate
import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, PartialState


class DeepSpeedOnCPU(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for shared in (PartialState._shared_state, AcceleratorState._shared_state):
            shared.update(num_processes=dist.get_world_size(), process_index=dist.get_rank(),
                          local_process_index=int(os.environ["LOCAL_RANK"]), device=torch.device("cpu"),
                          backend=dist.get_backend())


accelerate.Accelerator = DeepSpeedOnCPU
from anyverse.cli.app import main

sys.argv[0] = "anyverse"
main()
'''


@pytest.mark.slow
def test_deepspeed_zero2_bf16_on_two_cpu_processes_trains_evaluates_and_resumes(tmp_path: Path,
                                                                              anyverse_home: str) -> None:
    pytest.importorskip("deepspeed")
    runner = CliRunner()
    world = tmp_path / "world"
    assert runner.invoke(app, ["data", "toyworld", str(world), "--n", "24", "--seed", "0"]).exit_code == 0
    lines = (world / "pairs-train.jsonl").read_text().splitlines()
    (world / "ds-train.jsonl").write_text("\n".join(lines[:8]) + "\n")
    (world / "ds-eval.jsonl").write_text("\n".join((world / "pairs-test.jsonl").read_text().splitlines()[:2]) + "\n")

    def config(name: str, **fields: Any) -> Path:
        data = {"stage": "encoder-alignment", "model": "tiny", "output_dir": str(tmp_path / name),
                "data": {"train": str(world / "ds-train.jsonl"), "eval": str(world / "ds-eval.jsonl")},
                "steps": 4, "batch_size": 2, "log_every": 1, "save_every": 2, "eval_every": 2, "keep_checkpoints": 5,
                **fields}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    warm = runner.invoke(app, ["train", "encoder-alignment", "--config", str(config("warm", steps=1))])
    assert warm.exit_code == 0, warm.output
    driver = tmp_path / "deepspeed_on_cpu.py"
    driver.write_text(DEEPSPEED_DRIVER)
    env = {**os.environ, "ANYVERSE_HOME": anyverse_home, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu"}

    def deepspeed(name: str) -> str:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(CONFIGS / "deepspeed-zero2.yaml"), "--num_processes", "2",
                   "--main_process_port", str(free_port()), str(driver),
                   "train", "encoder-alignment", "--config", str(config(name))]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stderr

    deepspeed("a")
    first = rows(tmp_path / "a")
    assert sorted(first) == [1, 2, 3, 4] and any(k.startswith("eval/") for k in first[4])
    checkpoint = tmp_path / "a" / "step-000004"
    assert (checkpoint / "projectors.safetensors").is_file()
    assert json.loads((checkpoint / "state" / "trainer.json").read_text())["world_size"] == 2

    shutil.copytree(tmp_path / "a" / "step-000002", tmp_path / "b" / "step-000002")
    assert "resuming without the optimizer's moments" in deepspeed("b")
    resumed = rows(tmp_path / "b")
    assert sorted(resumed) == [3, 4]
    assert resumed[3]["loss"] == first[3]["loss"]  # weights restored; AdamW's moments restart (not saved)
