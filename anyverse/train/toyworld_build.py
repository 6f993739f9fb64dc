"""``anyverse train toyworld``: make the toy world and run the five shipped stage configs in order, installing the
results where the ``toyworld`` profile looks ($ANYVERSE_HOME/toyworld); and the held-out evaluation of a model.

Each stage resumes from its own checkpoints, so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import shutil
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from anyverse.checkpoint import ADAPTER, MANIFEST, PROJECTORS
from anyverse.config import anyverse_home
from anyverse.train.config import TrainConfig, load_train_config
from anyverse.train.loop import final_checkpoint
from anyverse.train.run import run_config
from anyverse.types import OUTPUT_MODALITIES

log = logging.getLogger(__name__)

# Decoder alignment runs last, on the instruction-tuned LLM: LoRA moves the signal states the output projectors read
# (trained before it, the toy world's projections collapsed to one output; README has the numbers).
BUILD_STAGES = ("lm-pretrain", "encoder-pretrain", "encoder-alignment", "instruction-tuning", "decoder-alignment")
# Stages that need only the data run side by side, each in a process of its own at one thread: a thread does more
# work per second than two sharing cores, and the result does not depend on the machine (README, where the time went).
SIDE_BY_SIDE = ("lm-pretrain", "encoder-pretrain")
# what each stage's final checkpoint contributes to $ANYVERSE_HOME/toyworld
INSTALL = {"lm-pretrain": ["llm"], "encoder-pretrain": ["encoder"], "instruction-tuning": [ADAPTER],
           "decoder-alignment": [PROJECTORS]}


def stage_config_path(stage: str) -> Path:
    return Path(str(resources.files("anyverse.train.configs") / f"toyworld-{stage}.yaml"))


# Seconds each build step took with the shipped configs on 2 CPU cores, the SIDE_BY_SIDE ones timed running beside
# each other: the build's ETA scales the steps still to run by how fast this machine ran the ones done.
REFERENCE_SECONDS = {"data": 5, "lm-pretrain": 155, "encoder-pretrain": 155, "encoder-alignment": 130,
                     "instruction-tuning": 85, "decoder-alignment": 21, "eval": 42}


class BuildClock:
    """A line as each build step starts, with the whole build's ETA, and each step's seconds (build.json)."""

    def __init__(self, report: Callable[[str], None]):
        self.report, self.left = report, list(REFERENCE_SECONDS)
        self.seconds: dict[str, float] = {}

    def start(self, name: str, detail: str = "") -> float:
        trained = {step: seconds for step, seconds in self.seconds.items() if step != "data"}  # data: mostly imports
        done = sum(REFERENCE_SECONDS[step] for step in trained)
        speed = sum(trained.values()) / done if done else 1.0
        together = [REFERENCE_SECONDS[step] for step in self.left if step in SIDE_BY_SIDE]
        alone = [REFERENCE_SECONDS[step] for step in self.left if step not in SIDE_BY_SIDE]
        eta = speed * (sum(alone) + max(together, default=0))
        self.report(f"toyworld [{list(REFERENCE_SECONDS).index(name) + 1}/{len(REFERENCE_SECONDS)}] {name}{detail}"
                    f" · build ETA {eta / 60:.1f} min")
        return time.perf_counter()

    def finish(self, name: str, started: float | None) -> None:
        """``started`` None: the step was already done (a resumed build) and took no time now."""
        self.left.remove(name)
        if started is not None:
            self.seconds[name] = round(time.perf_counter() - started, 1)


def build_toyworld(n: int = 200, seed: int = 0, overrides: dict[str, list[str]] | None = None,
                   eval_limit: int = 120, report: Callable[[str], None] = log.info) -> dict[str, float]:
    """Data, then every stage (``overrides`` per stage name), then the held-out scores (also in toyworld/eval.json,
    with each step's seconds in toyworld/build.json). ``seed`` seeds the data and every stage's training. The
    pretraining stages run in spawned processes: a script that calls this needs ``if __name__ == "__main__":``."""
    from anyverse.train.toyworld import make_toyworld

    root = anyverse_home() / "toyworld"
    data = root / "data"
    clock = BuildClock(report)
    started = None
    if not (data / "toyworld.json").is_file():
        started = clock.start("data", f" ({n} items a modality, seed {seed})")
        make_toyworld(data, n, seed)
    clock.finish("data", started)
    configs = {stage: load_train_config(stage_config_path(stage), [f"seed={seed}", *(overrides or {}).get(stage, [])])
               for stage in BUILD_STAGES}
    together = [stage for stage in SIDE_BY_SIDE if not _finished(configs[stage])]
    if len(together) > 1:
        logs = root / "runs"
        starts = {stage: clock.start(stage, f" ({configs[stage].steps} steps, side by side"
                                            + ("" if stage == together[-1] else f"; progress in {logs / stage}.log")
                                            + ")")
                  for stage in together}
        for stage in run_side_by_side([configs[stage] for stage in together], logs):
            clock.finish(stage, starts[stage])
    for stage, config in configs.items():
        if stage in clock.left:
            started = None
            if not _finished(config):  # finished stages are not even reloaded
                started = clock.start(stage, f" ({config.steps} steps)")
                run_config(config)
            clock.finish(stage, started)
        final = final_checkpoint(config)
        for name in INSTALL.get(stage, []):
            target = root / name
            if target.is_dir():
                shutil.rmtree(target)
            (shutil.copytree if (final / name).is_dir() else shutil.copy2)(final / name, target)
    started = clock.start("eval", f" ({eval_limit} held-out items a task)")
    scores = evaluate_toyworld(None, data, limit=eval_limit)
    clock.finish("eval", started)
    (root / "eval.json").write_text(json.dumps(scores, indent=2))
    (root / "build.json").write_text(json.dumps({"seed": seed, "seconds": clock.seconds}, indent=2))
    return scores


def _finished(config: TrainConfig) -> bool:
    return (final_checkpoint(config) / MANIFEST).is_file()


def run_side_by_side(configs: list[TrainConfig], logs: Path) -> Iterator[str]:
    """Train each config in a process of its own at one thread, all at once; yields each stage as it finishes. The
    last shows its progress here; the others log to ``logs/STAGE.log``. A failed stage's error is raised once the
    others have finished, so their work is kept."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()
    logs.mkdir(parents=True, exist_ok=True)
    processes = {}
    for config in configs:
        log_file = None if config is configs[-1] else logs / f"{config.stage}.log"
        processes[config.stage] = context.Process(target=_train_in_process, name=config.stage,
                                                  args=(config, log_file, errors))
        processes[config.stage].start()
    try:
        waiting = dict(processes)
        while waiting:
            for stage, process in list(waiting.items()):
                process.join(timeout=0.5)
                if process.exitcode is not None:
                    del waiting[stage]
                    if process.exitcode == 0:
                        yield stage
    finally:
        for process in processes.values():
            if process.is_alive():
                process.terminate()
                process.join()
    reported = {}
    while not errors.empty():
        stage, err = errors.get()
        reported[stage] = err
    for stage, process in processes.items():
        if process.exitcode != 0:
            raise reported.get(stage, RuntimeError(f"{stage}: its process ended with exit code {process.exitcode}"))


def _train_in_process(config: TrainConfig, log_file: Path | None, errors: Any) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.ExitStack() as stack:
        if log_file is not None:
            out = stack.enter_context(open(log_file, "a"))
            stack.enter_context(contextlib.redirect_stderr(out))
            stack.enter_context(contextlib.redirect_stdout(out))
        try:
            run_config(config)
        except BaseException as err:  # the parent raises it, after the other stages finish
            errors.put((config.stage, err if _picklable(err) else RuntimeError(f"{config.stage}: {err}")))
            raise SystemExit(1) from None


def _picklable(err: BaseException) -> bool:
    try:
        pickle.dumps(err)
    except Exception:
        return False
    return True


def evaluate_toyworld(checkpoint: Path | None, data: Path, profile: str = "toyworld",
                      limit: int = 120) -> dict[str, float]:
    """Every toy-world score on held-out data: captions, decoder retrieval, routing in both output modes."""
    from anyverse.session import Anyverse
    from anyverse.train.decoder_alignment import decoder_retrieval
    from anyverse.train.evaluation import caption_accuracy, load_pairs, routing_accuracy
    from anyverse.train.instruction_tuning import load_dialogs

    overrides = ["output.mode=signal", "llm.temperature=0"]  # signal mode builds the output projectors
    session: Any = (Anyverse.from_checkpoint(checkpoint, overrides) if checkpoint
                    else Anyverse.from_profile(profile, overrides))
    model = session.model
    pairs, features = load_pairs(model, data / "pairs-test.jsonl", limit=limit)
    scores = caption_accuracy(model, pairs, features)
    outputs = {m for m in OUTPUT_MODALITIES if m.value in model.output_projectors}
    scores |= decoder_retrieval(model, session.generators, data / "pairs-train.jsonl", data / "pairs-test.jsonl",
                                outputs, limit)
    # a quarter of the dialogs are conversations, not their share of the manifest (1 in 9), so that each turn
    # position past the second, which only some conversations reach, is scored on more than a handful
    share = max(1, limit // 4)
    talks, _ = load_dialogs(model, data / "dialogs-test.jsonl", share, lambda d: d.is_conversation)
    single, _ = load_dialogs(model, data / "dialogs-test.jsonl", max(1, limit - share), lambda d: not d.is_conversation)
    return scores | routing_accuracy(model, single + talks, ["meta", "signal"])
