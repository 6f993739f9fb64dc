"""The output folder of a batch run: ``results.jsonl`` (appended and fsync'd per batch), ``run.json`` and status.

Each result line carries its job's id, status, failure reason and job digest, in either line format, so a rerun
knows what is finished. A torn last line (power loss mid-write) is cut off on resume; that job simply runs again.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anyverse.jsonl import json_line

RESULTS = "results.jsonl"
RUN = "run.json"


@dataclass(frozen=True)
class Finished:
    """What resume needs to know of one result line."""

    id: str
    status: str
    reason: str | None
    digest: str | None


def finished_of(record: dict[str, Any]) -> Finished:
    """Read a result line of either format (OpenAI lines keep anyverse's bookkeeping under ``anyverse``)."""
    own = record.get("anyverse", record)
    return Finished(id=str(record.get("custom_id", record.get("id"))), status=own["status"],
                    reason=own.get("reason"), digest=own.get("job_digest"))


class ResultStore:
    """``DIR/results.jsonl``: one line per finished job, never two for the same id."""

    def __init__(self, out: Path):
        self.path = out / RESULTS

    def repair(self) -> int:
        """Cut a torn or unreadable last line; returns the bytes dropped."""
        if not self.path.is_file():
            return 0
        good = 0
        with open(self.path, "rb") as f:
            while raw := f.readline():
                try:
                    if not raw.endswith(b"\n"):
                        raise ValueError("torn")
                    finished_of(json.loads(raw))
                except (ValueError, KeyError, TypeError, AttributeError):
                    break
                good = f.tell()
            end = f.seek(0, os.SEEK_END)
        if good < end:
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        return end - good

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            for raw in f:
                yield json.loads(raw)

    def finished(self) -> dict[str, Finished]:
        return {f.id: f for f in map(finished_of, self.records())}

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append lines and fsync, so a kill after this returns loses none of them."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json_line(r) + "\n" for r in records).encode()
        if not data:
            return
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def drop(self, ids: set[str]) -> None:
        """Rewrite the file without these ids' lines (jobs about to run again), atomically."""
        if not ids or not self.path.is_file():
            return
        fd, tmp = tempfile.mkstemp(prefix=".results-", dir=self.path.parent)
        with os.fdopen(fd, "wb") as out, open(self.path, "rb") as f:
            for raw in f:
                if finished_of(json.loads(raw)).id not in ids:
                    out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)


def read_run(out: Path) -> dict[str, Any] | None:
    path = out / RUN
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: unreadable ({err}); delete it to start over") from None


def write_run(out: Path, manifest: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RUN}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / RUN)


def status(out: Path) -> dict[str, Any]:
    """done / failed (by reason) / pending of a run folder; pending needs the job file run.json names."""
    from anyverse.batch.jobs import scan

    manifest = read_run(out)
    if manifest is None:
        raise FileNotFoundError(f"{out}: no {RUN} here; is it a batch run's --out folder?")
    store = ResultStore(out)
    store.repair()
    finished = store.finished()
    reasons = Counter(f.reason or "unknown" for f in finished.values() if f.status == "failed")
    job_file, root = Path(manifest["job_file"]), Path(manifest["root"])
    pending: int | None = None
    if job_file.is_file():
        pending = sum(1 for ref in scan(job_file, root).refs if ref.id not in finished)
    return {"out": str(out), "job_file": str(job_file), "done": sum(f.status == "ok" for f in finished.values()),
            "failed": sum(reasons.values()), "failed_by_reason": dict(reasons.most_common()), "pending": pending}
