"""``anyverse train toyworld``: make the toy world and run the five shipped stage configs in order, installing the
results where the ``toyworld`` profile looks ($ANYVERSE_HOME/toyworld); and the held-out evaluation of a model.

Each stage resumes from its own checkpoints, so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from anyverse.checkpoint import ADAPTER, MANIFEST, PROJECTORS
from anyverse.config import anyverse_home
from anyverse.train.config import load_train_config
from anyverse.train.run import run_config
from anyverse.types import OUTPUT_MODALITIES

log = logging.getLogger(__name__)

# Decoder alignment runs last, on the instruction-tuned LLM: LoRA moves the signal states the output projectors read
# (trained before it, the toy world's projections collapsed to one output; README has the numbers).
BUILD_STAGES = ("lm-pretrain", "encoder-pretrain", "encoder-alignment", "instruction-tuning", "decoder-alignment")
# what each stage's final checkpoint contributes to $ANYVERSE_HOME/toyworld
INSTALL = {"lm-pretrain": ["llm"], "encoder-pretrain": ["encoder"], "instruction-tuning": [ADAPTER],
           "decoder-alignment": [PROJECTORS]}


def stage_config_path(stage: str) -> Path:
    return Path(str(resources.files("anyverse.train.configs") / f"toyworld-{stage}.yaml"))


# Seconds each build step took with the shipped configs on 2 CPU cores: the build's ETA scales the steps still to
# run by how fast this machine ran the ones done.
REFERENCE_SECONDS = {"data": 3, "lm-pretrain": 72, "encoder-pretrain": 132, "encoder-alignment": 110,
                     "instruction-tuning": 60, "decoder-alignment": 14, "eval": 44}


class BuildClock:
    """A line as each build step starts, with the whole build's ETA, and each step's seconds (build.json)."""

    def __init__(self, report: Callable[[str], None]):
        self.report, self.left = report, list(REFERENCE_SECONDS)
        self.seconds: dict[str, float] = {}

    def start(self, name: str, detail: str = "") -> float:
        done = sum(REFERENCE_SECONDS[step] for step in self.seconds)
        speed = sum(self.seconds.values()) / done if done else 1.0
        eta = speed * sum(REFERENCE_SECONDS[step] for step in self.left)
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
    with each step's seconds in toyworld/build.json). ``seed`` seeds the data and every stage's training."""
    from anyverse.train.toyworld import make_toyworld

    root = anyverse_home() / "toyworld"
    data = root / "data"
    clock = BuildClock(report)
    started = None
    if not (data / "toyworld.json").is_file():
        started = clock.start("data", f" ({n} items a modality, seed {seed})")
        make_toyworld(data, n, seed)
    clock.finish("data", started)
    for stage in BUILD_STAGES:
        config = load_train_config(stage_config_path(stage), [f"seed={seed}", *(overrides or {}).get(stage, [])])
        final = config.output_dir / f"step-{config.steps:06d}"
        started = None
        if not (final / MANIFEST).is_file():  # finished stages are not even reloaded
            started = clock.start(stage, f" ({config.steps} steps)")
            final = run_config(config)
        clock.finish(stage, started)
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
    talks, _ = load_dialogs(model, data / "dialogs-test.jsonl", share, lambda d: len(d.messages) > 2)
    single, _ = load_dialogs(model, data / "dialogs-test.jsonl", max(1, limit - share), lambda d: len(d.messages) == 2)
    return scores | routing_accuracy(model, single + talks, ["meta", "signal"])
