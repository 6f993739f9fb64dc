"""JSONL manifest formats for media-caption pairs and dialogs, and a reader that skips bad lines with a count.

One JSON object per line. Paths are relative to the manifest's own directory (or absolute). A line that does not
parse, does not validate, or names a missing file is skipped and counted; a run never dies on one bad line.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from anyverse.signals import MEDIA_ID_PATTERN
from anyverse.types import OUTPUT_MODALITIES, Modality

log = logging.getLogger(__name__)


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PairRecord(Record):
    """One line of a pairs manifest: a media file and its caption (encoder and decoder alignment)."""

    media: str = Field(description="file path, relative to the manifest's directory")
    modality: Modality
    caption: str = Field(min_length=1)
    attributes: dict[str, str] = Field(default_factory=dict, description="e.g. toy-world shape/colour/position")


class CaptionRecord(BaseModel):
    """A caption of some modality, no media: lm-pretrain reads captions back from a media block written as text, so
    it takes a captions manifest or a pairs manifest (whose ``media`` it ignores)."""

    model_config = ConfigDict(extra="ignore")
    modality: Modality
    caption: str = Field(min_length=1)


class MediaRef(Record):
    id: str = Field(pattern=MEDIA_ID_PATTERN, description="how the dialog text refers to it, e.g. img_1")
    media: str = Field(description="file path, relative to the manifest's directory")
    modality: Modality


class RequestRecord(Record):
    """Media the assistant asks for: rendered as a meta-response or as a description plus signal tokens."""

    modality: Modality
    prompt: str = Field(min_length=1)
    source: str | None = Field(default=None, pattern=MEDIA_ID_PATTERN)

    @field_validator("modality")
    @classmethod
    def _generatable(cls, modality: Modality) -> Modality:
        if modality not in OUTPUT_MODALITIES:
            raise ValueError(f"{modality.value} cannot be generated; use image, video or audio")
        return modality


class TurnRecord(Record):
    role: Literal["user", "assistant"]
    text: str = ""
    media: list[MediaRef] = Field(default_factory=list, description="user turns: attached media; assistant turns: "
                                  "what their requests produced, which later turns see")
    requests: list[RequestRecord] = Field(default_factory=list, description="assistant turns: media to make")


class DialogRecord(Record):
    """One line of a dialogs manifest (instruction tuning): user and assistant turns; every assistant turn is a
    reply to learn (or score) given the turns before it."""

    messages: list[TurnRecord] = Field(min_length=2)
    attributes: dict[str, str] = Field(default_factory=dict, description="e.g. toy-world intent")

    @model_validator(mode="after")
    def _has_a_reply(self) -> DialogRecord:
        if not any(t.role == "assistant" for t in self.messages[1:]):
            raise ValueError("no assistant turn after the first turn: nothing to learn")
        return self

    @property
    def is_conversation(self) -> bool:
        """More than one exchange (a single one is a user turn and its reply)."""
        return len(self.messages) > 2


R = TypeVar("R", PairRecord, DialogRecord, CaptionRecord)


@dataclass
class SkipReport:
    """Why lines were skipped, counted by reason; ``summary()`` is the one line a run logs."""

    source: Path
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, line_no: int, detail: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, f"line {line_no}: {detail}")

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.source}: {self.kept} records"
        reasons = "; ".join(f"{n} {reason} (first: {self.examples[reason]})" for reason, n in self.skipped.items())
        return f"{self.source}: {self.kept} records, skipped {sum(self.skipped.values())}: {reasons}"


def resolve(manifest: Path, path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else manifest.parent / candidate


def _media_paths(record: PairRecord | DialogRecord | CaptionRecord) -> list[str]:
    if isinstance(record, PairRecord):
        return [record.media]
    if isinstance(record, CaptionRecord):
        return []
    return [ref.media for turn in record.messages for ref in turn.media]


def read_manifest(path: Path, kind: type[R], report: SkipReport | None = None) -> Iterator[R]:
    """Yield valid records of ``kind`` whose media files exist; count the rest in ``report``."""
    report = report if report is not None else SkipReport(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    with path.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = kind.model_validate(json.loads(line))
            except json.JSONDecodeError as err:
                report.skip("not JSON", line_no, str(err))
                continue
            except ValidationError as err:
                report.skip("invalid record", line_no, str(err.errors()[0]["msg"]))
                continue
            missing = [p for p in _media_paths(record) if not resolve(path, p).is_file()]
            if missing:
                report.skip("missing file", line_no, missing[0])
                continue
            report.kept += 1
            yield record


def write_manifest(path: Path, records: list[PairRecord] | list[DialogRecord] | list[CaptionRecord]) -> None:
    """Write records as JSONL (atomically: a temp file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(record.model_dump_json(exclude_defaults=True) + "\n")
    tmp.replace(path)
