"""``--engine ray``: the same batches through Ray Data, for users who outgrow one machine.

The driver validates and numbers lines itself and hands Ray only the places (line number, byte offset) of the
jobs left to run (``from_items``), already ordered so a batch holds jobs that need the same things; ``map_batches``
runs them on an actor pool whose actors load the pipeline once and read their lines from the job file. Results
stream back to the driver, which appends them as they arrive. Workers read the job file and write media into the
run folder, so on a multi-node cluster both must be on a shared filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from anyverse.batch.engine import Plan, RunOptions
from anyverse.batch.jobs import read_lines
from anyverse.batch.worker import Settings, Worker


class RayWorker:
    """A Ray actor: loads the pipeline in ``__init__``, then runs one batch per call."""

    def __init__(self, settings: Settings, job_file: Path):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.worker = Worker(settings)
        self.job_file = job_file

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        places = [(int(n), int(o)) for n, o in zip(batch["line"], batch["offset"], strict=True)]
        results = self.worker.run(read_lines(self.job_file, places))
        return {"result": np.array([json.dumps(r) for r in results], dtype=object)}


def run_ray(chosen: Plan, options: RunOptions, write: Callable[[list[dict[str, Any]]], None],
            stop: threading.Event) -> None:
    """Dispatch the plan's jobs to an actor pool; joins ``options.address`` or starts a local Ray."""
    import ray

    items = [{"line": ref.line, "offset": ref.offset} for batch in chosen.batches for ref in batch]
    if not items:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= options.workers else 0
        results = ray.data.from_items(items).map_batches(
            RayWorker, batch_size=options.batch_size, compute=ray.data.ActorPoolStrategy(size=options.workers),
            fn_constructor_kwargs={"settings": chosen.settings, "job_file": chosen.scan.path.resolve()},
            num_gpus=gpus)
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            write([json.loads(r) for r in batch["result"]])
            if stop.is_set():
                return
    finally:
        if started:
            ray.shutdown()
