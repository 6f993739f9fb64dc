"""One loaded model, one worker thread: jobs run one at a time in arrival order from a bounded queue.

A job's events cross to the event loop through an asyncio queue, so generation never blocks it; a job whose
client has gone is stopped (its ``stop`` event) or skipped before it starts. The model loads on the first job that
needs it; the generator pool is shared, so the Images API never loads the LLM.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from anyverse.encoders.cache import EmbeddingCache
from anyverse.plugins import GeneratorPool
from anyverse.session import Anyverse

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after
        super().__init__(f"the queue is full; retry in about {retry_after} s")


@dataclass
class Finished:
    """The job's return value, always the last item a job delivers (or its exception)."""

    value: Any = None
    error: BaseException | None = None


@dataclass
class Job:
    """A unit of work for the model thread; ``emit`` hands items to the waiting request."""

    work: Callable[[Job], Any]
    loop: asyncio.AbstractEventLoop
    stop: threading.Event = field(default_factory=threading.Event)
    items: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    finished: bool = False
    gone: bool = False

    def emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)

    def cancel(self) -> None:
        """The client left: stop the work (at the next token) unless it is already done."""
        if not self.finished:
            self.gone = True
            self.stop.set()


class Runner:
    def __init__(self, make_session: Callable[[], Anyverse], generators: GeneratorPool, max_queue: int):
        self._make_session, self.generators, self.max_queue = make_session, generators, max_queue
        self._session: Anyverse | None = None
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = False
        self.cancelled = 0
        self.model_state = "not loaded"
        self._seconds = 1.0  # moving average of a job's time, for Retry-After
        self._thread = threading.Thread(target=self._work, name="anyverse-model", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[Job], Any]) -> Job:
        """Queue ``work`` (run on the model thread); raises QueueFull when ``max_queue`` jobs already wait."""
        with self._lock:
            if self.waiting >= self.max_queue:
                raise QueueFull(max(1, round(self._seconds * (self.waiting + 1))))
            self.waiting += 1
        job = Job(work=work, loop=asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def session(self) -> Anyverse:
        """The conversation model, loaded on first use (model thread only)."""
        if self._session is None:
            self.model_state = "loading"
            try:
                session = self._make_session()
            except BaseException:
                self.model_state = "not loaded"
                raise
            session.generators = self.generators  # one pool: the Images API and chat share loaded generators
            self._session, self.model_state = session, "ready"
        return self._session

    @property
    def embedding_cache(self) -> EmbeddingCache | None:
        """The loaded model's embedding cache: re-sent history is encoded once."""
        return self._session.model.encoder.cache if self._session is not None else None

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self.waiting -= 1
                self.running = not job.gone
            started = time.perf_counter()
            if job.gone:  # the client left while waiting
                finished = Finished(error=ConnectionAbortedError("client gone"))
            else:
                try:
                    finished = Finished(value=job.work(job))
                except BaseException as err:  # delivered to the request, which maps it to a status
                    log.debug("job failed", exc_info=True)
                    finished = Finished(error=err)
                self._seconds = 0.7 * self._seconds + 0.3 * (time.perf_counter() - started)
            self.cancelled += job.gone
            job.finished, self.running = True, False
            job.emit(finished)
