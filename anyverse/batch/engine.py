"""A batch run: validate the job file, decide what is left (resume), then run it in batches, locally or on Ray.

Results are appended and fsync'd per batch, so a killed run loses at most its in-flight batch. The first SIGINT
or SIGTERM lets the in-flight batch finish and be written; a second abandons it.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from anyverse.batch.jobs import JobRef, Problem, Scan, read_lines, scan
from anyverse.batch.store import Finished, ResultStore, read_run, write_run

if TYPE_CHECKING:
    from anyverse.config import AnyverseConfig

log = logging.getLogger(__name__)

GROUP_WINDOW = 16  # batches' worth of jobs sorted together by what they need


@dataclass(frozen=True)
class RunOptions:
    """Everything ``anyverse batch run`` takes."""

    jobs: Path
    out: Path
    root: Path | None = None
    profile: str = "tiny"
    overrides: tuple[str, ...] = ()
    batch_size: int = 8
    seed: int = 0
    engine: Literal["local", "ray"] = "local"
    address: str | None = None
    workers: int = 1
    retry_failed: bool = False
    skip_invalid: bool = False
    force: bool = False
    limit: int | None = None


@dataclass
class Plan:
    """What this run will do: the jobs left, in batches, and what it reported on the way."""

    scan: Scan
    settings: Any  # worker.Settings (imported lazily: it pulls in torch)
    batches: list[list[JobRef]]
    invalid: dict[str, dict[str, Any]]  # job id -> failed result line, for invalid lines not yet recorded
    finished: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(map(len, self.batches))


@dataclass
class Outcome:
    done: int = 0
    failed: int = 0
    stopped: bool = False


def fingerprint(config: AnyverseConfig, seed: int) -> str:
    """What results depend on: the resolved config and the run seed (not batch size, engine or workers)."""
    return hashlib.sha256(f"{config.fingerprint()}:{seed}".encode()).hexdigest()[:16]


def plan(options: RunOptions) -> Plan:
    """Validate the whole file, check run.json, and pick the jobs to run; raises ValueError with the reason."""
    from anyverse.batch.worker import Settings

    root = (options.root or options.jobs.parent).resolve()
    checked = scan(options.jobs, root)
    if checked.problems and not options.skip_invalid:
        raise ValueError(f"{options.jobs}: {len(checked.problems)} invalid line(s); fix them or pass --skip-invalid\n"
                         f"{checked.report()}")
    settings = Settings(options.profile, options.overrides, options.out.resolve(), root, checked.format, options.seed)
    config = settings.config()
    manifest = {"job_file": str(options.jobs.resolve()), "job_file_sha256": checked.sha256, "format": checked.format,
                "root": str(root), "profile": options.profile, "overrides": list(options.overrides),
                "seed": options.seed, "fingerprint": fingerprint(config, options.seed),
                "config": config.model_dump(mode="json")}
    notes = _check_manifest(read_run(options.out), manifest, options.force)
    store = ResultStore(options.out)
    if torn := store.repair():
        notes.append(f"{store.path}: cut a torn last line ({torn} bytes); that job runs again")
    finished = store.finished()
    todo, redo = _select(checked.refs, finished, options, notes)
    invalid = _invalid_records(checked, settings)
    stale = {f.id for f in finished.values() if f.reason == "invalid job"} - set(invalid)
    replaced = {ref.id for ref in todo} & redo
    store.drop(replaced | stale)
    write_run(options.out, manifest)
    return Plan(scan=checked, settings=settings, batches=grouped(todo, options.batch_size),
                invalid={k: r for k, r in invalid.items() if k not in finished},
                finished=len(finished) - len(replaced) - len(stale), notes=notes)


def _select(refs: list[JobRef], finished: dict[str, Finished], options: RunOptions,
            notes: list[str]) -> tuple[list[JobRef], set[str]]:
    """The jobs to run (new ones; failed with --retry-failed; changed with --force), and which of them replace a
    result line."""
    todo, redo = [], set()
    for ref in refs:
        done = finished.get(ref.id)
        if done is not None and done.digest is not None and done.digest != ref.digest:
            if not options.force:
                notes.append(f"job {ref.id!r} (line {ref.line}) changed since it finished; kept (--force redoes it)")
                continue
            redo.add(ref.id)
        elif done is not None and not (done.status == "failed" and options.retry_failed):
            continue
        elif done is not None:
            redo.add(ref.id)
        todo.append(ref)
    return (todo[: options.limit] if options.limit is not None else todo), redo


def _check_manifest(old: dict[str, Any] | None, new: dict[str, Any], force: bool) -> list[str]:
    """A resumed run must use the same config and seed; a changed job file is reported (per job, by digest)."""
    if old is None:
        return []
    if old.get("fingerprint") != new["fingerprint"]:
        if not force:
            raise ValueError(f"{new['job_file']}: this --out was run with another config or seed (fingerprint "
                             f"{old.get('fingerprint')} vs {new['fingerprint']}); use a new --out, or --force to "
                             "go on with this one")
        return ["config changed since the last run (--force): finished jobs are kept as they are"]
    if old.get("job_file_sha256") != new["job_file_sha256"]:
        return [f"{new['job_file']} changed since the last run: new jobs run, finished ones are checked by content"]
    return []


def _invalid_records(checked: Scan, settings: Any) -> dict[str, dict[str, Any]]:
    """Failed result lines for invalid lines (--skip-invalid), under their job id when it is usable."""
    from anyverse.batch.worker import JobRun, render

    taken = {ref.id for ref in checked.refs}
    records = {}
    for problem in checked.problems:
        job_id = _invalid_id(problem, taken)
        taken.add(job_id)
        job = JobRun(line=problem.line, id=job_id)
        job.fail("invalid job", str(problem))
        records[job_id] = render(job, settings)
    return records


def _invalid_id(problem: Problem, taken: set[str]) -> str:
    return problem.id if problem.id and problem.id not in taken else f"line-{problem.line}"


def grouped(refs: list[JobRef], batch_size: int) -> list[list[JobRef]]:
    """Batches in file order by windows; inside a window, jobs that need the same things sit together."""
    window = batch_size * GROUP_WINDOW
    ordered = [ref for start in range(0, len(refs), window)
               for ref in sorted(refs[start : start + window], key=lambda r: r.key)]
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def execute(options: RunOptions, chosen: Plan, on_results: Callable[[list[dict[str, Any]]], None],
            on_stage: Callable[[str], None] | None = None) -> Outcome:
    """Run the plan's batches, appending each batch's results as it finishes; ``on_stage`` hears the local
    engine's phases (encode, decode, generate) as they start."""
    store = ResultStore(options.out)
    store.append(chosen.invalid.values())
    outcome = Outcome()

    def write(records: list[dict[str, Any]]) -> None:
        store.append(records)
        failed = sum(_status(r) == "failed" for r in records)
        outcome.done += len(records) - failed
        outcome.failed += failed
        on_results(records)

    with Interrupts() as interrupts:
        if options.engine == "ray":
            from anyverse.batch.ray_engine import run_ray

            run_ray(chosen, options, write, interrupts.requested)
        else:
            run_local(chosen, write, interrupts.requested, on_stage)
        outcome.stopped = interrupts.requested.is_set()
    return outcome


def run_local(chosen: Plan, write: Callable[[list[dict[str, Any]]], None], stop: threading.Event,
              on_stage: Callable[[str], None] | None = None) -> None:
    """One worker in this process: models load once, batches run in order until done or asked to stop."""
    from anyverse.batch.worker import Worker

    if not chosen.batches:
        return
    worker = Worker(chosen.settings)
    for batch in chosen.batches:
        if stop.is_set():
            return
        write(worker.run(read_lines(chosen.scan.path, [(ref.line, ref.offset) for ref in batch]), on_stage))


def _status(record: dict[str, Any]) -> str:
    return record.get("anyverse", record)["status"]


class Interrupts:
    """First SIGINT/SIGTERM: set ``requested`` (the in-flight batch finishes and is written); second: abandon."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested.is_set():
            raise KeyboardInterrupt
        self.requested.set()
        log.warning("stopping after the batch in flight (interrupt again to abandon it)")

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
