"""README's build: `anyverse train toyworld` with the shipped configs, on a seed they were not tuned on, reaches
what README reports for it: the targets (caption 0.90, compositional 0.6, routing 0.95 at every turn) are met on
the mean of seeds 1 and 2; the floors below sit under seed 1's scores by the spread between runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HELD_OUT_SEED = 1  # the configs were tuned on seed 0


@pytest.mark.slow
@pytest.mark.last
def test_the_shipped_configs_reach_readmes_scores_on_a_held_out_seed(tmp_path: Path) -> None:
    env = {**os.environ, "ANYVERSE_HOME": str(tmp_path), "OMP_NUM_THREADS": "2"}  # README's machine: 2 cores
    build = subprocess.run([sys.executable, "-m", "anyverse.cli.app", "train", "toyworld", "--seed",
                            str(HELD_OUT_SEED)], env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    scores = json.loads(build.stdout)
    steps = [line for line in build.stderr.splitlines() if line.startswith("toyworld [")]
    assert len(steps) == 7 and all("build ETA" in line for line in steps), steps  # data, five stages, eval
    seconds = json.loads((tmp_path / "toyworld" / "build.json").read_text())["seconds"]
    assert set(seconds) == {"data", "lm-pretrain", "encoder-pretrain", "encoder-alignment", "instruction-tuning",
                            "decoder-alignment", "eval"}

    assert scores["caption_accuracy"] >= 0.85
    assert scores["caption_accuracy/test"] >= 0.85
    assert scores["caption_accuracy/compositional"] >= 0.6  # 0.42 before the grey view, 0.09 before grey images
    assert scores["decoder_retrieval"] >= 0.95
    assert scores["routing_accuracy"] >= 0.95
    turns = {key: value for key, value in scores.items() if key.startswith("routing_accuracy/") and "/turn_" in key}
    assert len(turns) == 8 and min(turns.values()) >= 0.9, turns  # turns 1-4 in both output modes
    assert scores["made_caption_accuracy/meta"] >= 0.8
