"""The nouns every module shares: modalities, media items, requests, events and turn results."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Modality(StrEnum):
    """What a media item is. Text, depth and thermal are inputs only; image, video and audio go both ways."""

    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"
    VIDEO = "video"
    DEPTH = "depth"
    THERMAL = "thermal"

    @property
    def label(self) -> str:
        """Short prefix of the ids the model sees and writes (``img_1``, ``aud_2``)."""
        return _LABELS[self]


_LABELS = {
    Modality.TEXT: "txt",
    Modality.IMAGE: "img",
    Modality.AUDIO: "aud",
    Modality.VIDEO: "vid",
    Modality.DEPTH: "dep",
    Modality.THERMAL: "thm",
}

OUTPUT_MODALITIES = (Modality.IMAGE, Modality.VIDEO, Modality.AUDIO)


class Media(BaseModel):
    """One media item: where its bytes are, what they are, and the id the conversation knows it by.

    Decoding happens on demand in :mod:`anyverse.media`; this record is small and serialisable.
    """

    model_config = ConfigDict(frozen=True)

    modality: Modality
    path: Path
    sha256: str
    format: str = Field(description="container/codec sniffed from the bytes, e.g. 'png', 'wav', 'mp4'")
    original_name: str
    id: str | None = Field(default=None, description="conversation id such as 'img_1', set by the session")

    def with_id(self, media_id: str) -> Media:
        return self.model_copy(update={"id": media_id})


class GenerationOptions(BaseModel):
    """Options every generator understands; plugins may add their own on top."""

    model_config = ConfigDict(extra="forbid")

    seed: int | None = None
    steps: int | None = Field(default=None, ge=1, le=1000)
    guidance: float | None = Field(default=None, ge=0.0, le=50.0)
    width: int | None = Field(default=None, ge=8, le=4096)
    height: int | None = Field(default=None, ge=8, le=4096)
    frames: int | None = Field(default=None, ge=1, le=512)
    seconds: float | None = Field(default=None, gt=0.0, le=600.0)


class MediaRequest(BaseModel):
    """A validated request for new media, from a meta-response or from signal tokens."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    modality: Modality
    prompt: str | None = None
    source: str | None = Field(default=None, description="id of a conversation media item to edit or vary")
    options: GenerationOptions = Field(default_factory=GenerationOptions)
    origin: Literal["meta", "signal", "direct"] = "direct"
    conditioning: dict[str, Any] | None = Field(
        default=None, exclude=True, description="tensors from the output projector (signal mode)"
    )

    def __repr_args__(self):  # type: ignore[no-untyped-def]
        """Conditioning tensors print as their shapes, so events and results stay readable."""
        for key, value in super().__repr_args__():
            if key == "conditioning" and value is not None:
                value = {k: tuple(getattr(v, "shape", ())) for k, v in value.items()}
            yield key, value


class Message(BaseModel):
    """One conversation turn. Media come before the text for users and after it for the assistant, whose
    ``requests`` keep what was asked for (prompt, source, effective seed), one per produced item."""

    role: Literal["system", "user", "assistant"]
    text: str = ""
    media: list[Media] = Field(default_factory=list)
    requests: list[MediaRequest] = Field(default_factory=list)


class TextDelta(BaseModel):
    kind: Literal["text"] = "text"
    text: str


class MediaRequested(BaseModel):
    kind: Literal["request"] = "request"
    request: MediaRequest
    index: int = Field(description="order of the request within the reply")


class MediaProduced(BaseModel):
    kind: Literal["media"] = "media"
    media: Media
    request: MediaRequest
    seconds: float


class MediaProgress(BaseModel):
    """A generator's step callback, for live progress lines."""

    kind: Literal["progress"] = "progress"
    index: int = Field(description="order of the request within the reply")
    modality: Modality
    step: int
    total: int


class Notice(BaseModel):
    """Something went wrong but the turn goes on: shown to the user as text, never raised."""

    kind: Literal["notice"] = "notice"
    message: str


class TurnResult(BaseModel):
    """What one turn returns: the reply text, the media it made, and where time went.

    ``stopped``: the turn was interrupted; nothing was added to the conversation.
    """

    text: str
    media: list[MediaProduced] = Field(default_factory=list)
    notices: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    output_dir: Path | None = None
    stopped: bool = False
    user: Message | None = None
    assistant: Message | None = None


class TurnFinished(BaseModel):
    """Always the last event of a streamed turn."""

    kind: Literal["done"] = "done"
    result: TurnResult


Event = TextDelta | MediaRequested | MediaProgress | MediaProduced | Notice | TurnFinished

