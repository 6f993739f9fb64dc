"""``--engine ray``: the same batches through Ray Data, for users who outgrow one machine.

The driver validates and numbers lines itself and hands Ray only the jobs left to run (``from_items``), already
ordered so a batch holds jobs that need the same things; ``map_batches`` runs them on an actor pool whose actors
load the pipeline once. Results stream back to the driver, which appends them as they arrive. Workers write media
into the run folder, so on a multi-node cluster it must be a shared filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from anyverse.batch.engine import Plan, RunOptions, lines_of
from anyverse.batch.worker import Settings, Worker


class RayWorker:
    """A Ray actor: loads the pipeline in ``__init__``, then runs one batch per call."""

    def __init__(self, settings: Settings):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.worker = Worker(settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lines = [(int(n), str(t)) for n, t in zip(batch["line"], batch["text"], strict=True)]
        return {"result": np.array([json.dumps(r) for r in self.worker.run(lines)], dtype=object)}


def run_ray(chosen: Plan, options: RunOptions, write: Callable[[list[dict[str, Any]]], None],
            stop: threading.Event) -> None:
    """Dispatch the plan's jobs to an actor pool; joins ``options.address`` or starts a local Ray."""
    import ray

    items = [{"line": line, "text": text} for line, text in lines_of(chosen)]
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
            fn_constructor_kwargs={"settings": chosen.settings}, num_gpus=gpus)
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            write([json.loads(r) for r in batch["result"]])
            if stop.is_set():
                return
    finally:
        if started:
            ray.shutdown()
