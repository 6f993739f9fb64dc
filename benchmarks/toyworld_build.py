"""`anyverse train toyworld` from scratch, as README's main command runs it, on each given seed in a fresh
ANYVERSE_HOME: each step's seconds (build.json), the total against the 8-minute target, and the held-out scores
averaged over the seeds against theirs. Seed 0 is the one the shipped configs were tuned on.

    python benchmarks/toyworld_build.py [--seeds 1 2] [--threads 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 8 * 60
TARGETS = {"caption_accuracy": 0.90, "caption_accuracy/compositional": 0.6, "decoder_retrieval": 0.95,
           "routing_accuracy": 0.95}
SHOWN = [*TARGETS, "caption_accuracy/test", "made_caption_accuracy/meta", "made_caption_accuracy/signal"]


def build(seed: int, threads: int, home: Path) -> tuple[float, dict[str, float], dict[str, float]]:
    """Wall seconds of the whole command, its scores, and each step's seconds."""
    env = {**os.environ, "ANYVERSE_HOME": str(home), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "anyverse.cli.app", "train", "toyworld", "--seed", str(seed)],
                          env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    steps = json.loads((home / "toyworld" / "build.json").read_text())["seconds"]
    return wall, json.loads(done.stdout), steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="build in DIR/seed-N and keep it (default: a temporary folder)")
    args = parser.parse_args()
    all_scores = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            home = (args.keep or Path(scratch)) / f"seed-{seed}"
            wall, scores, steps = build(seed, args.threads, home)
            all_scores.append(scores)
            print(f"seed {seed}: {wall / 60:.1f} min ({wall / TARGET_SECONDS:.2f} of the target); "
                  + ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in steps.items()))
            print("  " + ", ".join(f"{key} {scores.get(key, float('nan')):.2f}" for key in SHOWN))
    mean = {key: statistics.mean(s.get(key, 0.0) for s in all_scores) for key in SHOWN}
    print(f"mean over seeds {args.seeds}: " + ", ".join(
        f"{key} {value:.2f}" + (f" (target {TARGETS[key]})" if key in TARGETS else "") for key, value in mean.items()))


if __name__ == "__main__":
    main()
