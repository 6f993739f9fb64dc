"""Batch jobs: grouped batching vs one job at a time, and what a SIGKILL costs, on the same 64 mixed jobs.

Targets: grouped batching >= 2x the jobs/s of one job at a time (``--batch-size 8`` vs ``1``, same process, models
loaded once before timing); after SIGKILL mid-run + resume, 0 jobs lost, no duplicate result lines, and no more
than one batch redone (results are fsync'd per batch, so only the batch in flight is lost).

    python benchmarks/batch_throughput.py [--jobs 64] [--llm-width 512 --llm-layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def mixed_jobs(folder: Path, count: int) -> Path:
    """Text only, image / audio / video in, image / audio / video out, in a fixed rotation."""
    import numpy as np

    from anyverse.media import save_audio, save_image, save_video

    rng = np.random.default_rng(0)
    tone = np.sin(np.linspace(0, 440 * 2 * np.pi, 16000)).astype(np.float32) * 0.5
    media = {"image": save_image(rng.random((40, 48, 3)), folder).path.name,
             "audio": save_audio(tone, 16000, folder).path.name,
             "video": save_video(rng.random((8, 32, 32, 3)), 8, folder).path.name}
    kinds = [{}, {"inputs": [media["image"]]}, {"inputs": [media["audio"]]}, {"inputs": [media["video"]]},
             {"outputs": ["image"]}, {}, {"inputs": [media["image"]]}, {"outputs": ["audio"]}]
    jobs = [{"id": f"job{i:03d}", "prompt": f"job number {i} " * (1 + i % 3), **kinds[i % len(kinds)]}
            for i in range(count)]
    jobs[5] = {**jobs[5], "outputs": ["video"]}
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def timed_run(jobs: Path, out: Path, overrides: tuple[str, ...], batch_size: int, limit: int | None = None) -> float:
    from anyverse.batch.engine import RunOptions, execute, plan

    options = RunOptions(jobs=jobs, out=out, overrides=overrides, batch_size=batch_size, limit=limit)
    start = time.perf_counter()
    outcome = execute(options, plan(options), lambda records: None)
    seconds = time.perf_counter() - start
    print(f"  batch size {batch_size}: {outcome.done} ok, {outcome.failed} failed in {seconds:.1f} s "
          f"({(outcome.done + outcome.failed) / seconds:.2f} jobs/s)")
    return seconds


def kill_and_resume(jobs: Path, out: Path, overrides: tuple[str, ...], batch_size: int, count: int) -> None:
    sets = [a for o in overrides for a in ("--set", o)]
    command = [sys.executable, "-m", "anyverse.cli.app", "batch", "run", str(jobs), "--out", str(out),
               "--batch-size", str(batch_size), *sets]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"

    def lines() -> int:
        return len(results.read_text().splitlines()) if results.is_file() else 0

    while proc.poll() is None and lines() < 2 * batch_size:
        time.sleep(0.01)
    time.sleep(1.0)  # well into the next batch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = lines()
    subprocess.run(command, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    ids = [json.loads(line)["id"] for line in results.read_text().splitlines()]
    lost = count - len(set(ids))
    print(f"  killed with {before} results written ({before // batch_size} whole batches); resume ran "
          f"{count - before}; lost {lost}, duplicate lines {len(ids) - len(set(ids))}; redone at most the batch in "
          f"flight ({batch_size} jobs; target <= one batch, 0 lost)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--llm-width", type=int, default=512)
    parser.add_argument("--llm-layers", type=int, default=8)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    overrides = (f"llm.tiny.arch.hidden_size={args.llm_width}",
                 f"llm.tiny.arch.intermediate_size={4 * args.llm_width}",
                 f"llm.tiny.arch.num_hidden_layers={args.llm_layers}", "output.mode=signal")
    folder = Path(tempfile.mkdtemp(prefix="anyverse-batch-bench-"))
    jobs = mixed_jobs(folder, args.jobs)
    print(f"{args.jobs} mixed jobs, tiny profile, LLM width {args.llm_width} x {args.llm_layers} layers")
    timed_run(jobs, folder / "warm", overrides, 8, limit=8)  # loads the models once, warms every generator
    one = timed_run(jobs, folder / "one", overrides, 1)
    grouped = timed_run(jobs, folder / "grouped", overrides, args.batch_size)
    print(f"grouped batching / one at a time: {one / grouped:.2f}x jobs/s  (target >= 2)")
    kill_and_resume(jobs, folder / "killed", overrides, args.batch_size, args.jobs)


if __name__ == "__main__":
    main()
