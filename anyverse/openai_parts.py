"""OpenAI chat shapes <-> anyverse messages: the one content-part parser that batch and serve share.

Inbound, ``parse_chat`` turns OpenAI ``messages`` (string or part content: ``text``, ``image_url``,
``input_audio``, ``file``, vLLM's ``video_url`` / ``audio_url``; assistant ``images`` / ``audio`` / ``audios`` /
``videos`` as returned) into :class:`~anyverse.types.Message` objects whose media went through
:mod:`anyverse.media`'s capped loaders, and ``modalities`` into the required-outputs set. Outbound,
``media_fields`` / ``media_delta`` write ``message.images`` / ``audio`` / ``audios`` / ``videos`` through an encoder
the caller passes (serve writes data or URLs, batch writes paths). Every refusal is one :class:`RequestError`.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from anyverse.config import Caps
from anyverse.media import MediaError, load_media, media_from_bytes
from anyverse.session import clean_text, next_id
from anyverse.types import OUTPUT_MODALITIES, Media, Message, Modality

__all__ = [
    "Encoded",
    "MediaSources",
    "ParsedChat",
    "RequestError",
    "derive_ids",
    "http_fetcher",
    "media_delta",
    "media_fields",
    "parse_chat",
    "parse_modalities",
]

_ID_PATTERN = re.compile(r"\b(" + "|".join(m.label for m in Modality) + r")_(\d+)\b")
# URL content part type -> the modality it must hold.
_URL_PARTS: dict[str, Modality] = {"image_url": Modality.IMAGE, "video_url": Modality.VIDEO,
                                   "audio_url": Modality.AUDIO}
# Response field for each output modality; audio also goes in the single ``audio`` field (OpenAI's own).
_FIELDS = {Modality.IMAGE: "images", Modality.AUDIO: "audios", Modality.VIDEO: "videos"}
MAX_MESSAGES = 256  # a conversation longer than this is refused (413): rendering cost grows with it
_ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    "system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(ValueError):
    """A refused request: the HTTP-ish ``status`` (400 malformed, 413 over a cap, 422 invalid value) and one line
    naming where in the request (``param``) and why."""

    def __init__(self, status: int, message: str, param: str | None = None):
        self.status, self.param = status, param
        self.message = re.sub(r"\s+", " ", f"{param}: {message}" if param else message).strip()
        super().__init__(self.message)


@dataclass(frozen=True)
class MediaSources:
    """Where content parts may take media from, and where decoded bytes are written (content-addressed).

    ``allowed_root`` lets paths and ``file://`` URLs in (batch); ``fetch`` lets http(s) URLs in (serve with
    ``--allow-remote-media``); ``resolve`` maps the caller's own media URLs and audio ids to stored files.
    """

    caps: Caps
    directory: Path
    allowed_root: Path | None = None
    fetch: Callable[[str], bytes] | None = None
    resolve: Callable[[str], Path | None] | None = None


@dataclass(frozen=True)
class ParsedChat:
    """The conversation as anyverse messages (media validated, ids given) and the outputs the reply must make."""

    messages: list[Message]
    require: frozenset[Modality]


@dataclass(frozen=True)
class Encoded:
    """How one media item is handed out: ``url`` (data: URL, server URL or file path), the ``handle`` a client
    sends back to refer to it (OpenAI's audio id), and when that stops working."""

    url: str
    handle: str
    expires_at: int | None = None


# ------------------------------------------------------------------------------------------------- inbound


def parse_modalities(modalities: Any) -> frozenset[Modality]:
    """``["text", "image"]`` -> the modalities the reply must make (text is always made)."""
    if modalities is None:
        return frozenset()
    if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
        raise RequestError(422, "must be a list of strings", "modalities")
    names = [m.value for m in OUTPUT_MODALITIES]
    unknown = [m for m in modalities if m != "text" and m not in names]
    if unknown:
        raise RequestError(422, f"unknown modality {clean_text(unknown[0])!r}; choose text, {', '.join(names)}",
                           "modalities")
    return frozenset(Modality(m) for m in modalities if m != "text")


def parse_chat(messages: Any, sources: MediaSources, modalities: Any = None) -> ParsedChat:
    """Validate every message and media item (all before anything runs), derive ids, check id references."""
    require = parse_modalities(modalities)
    if not isinstance(messages, list) or not messages:
        raise RequestError(422, "must be a non-empty list of messages", "messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(413, f"{len(messages)} messages exceed the cap of {MAX_MESSAGES}", "messages")
    parsed = derive_ids([_message(m, f"messages[{i}]", sources) for i, m in enumerate(messages)])
    _check_references(parsed)
    return ParsedChat(messages=parsed, require=require)


def derive_ids(messages: list[Message]) -> list[Message]:
    """Media ids as a chat session gives them (``img_1``, ``aud_2`` ...), so "make img_2 darker" means the same."""
    out: list[Message] = []
    for message in messages:
        media: list[Media] = []
        for item in message.media:
            media.append(item.with_id(next_id(item.modality, out, media)))
        out.append(message.model_copy(update={"media": media}))
    return out


def _check_references(messages: list[Message]) -> None:
    """The last user message may only name ids its conversation holds ("make img_2 darker")."""
    known = {m.id for message in messages for m in message.media}
    last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)
    if last is None:
        raise RequestError(400, "holds no user message", "messages")
    for match in _ID_PATTERN.finditer(messages[last].text):
        if match.group(0) not in known:
            raise RequestError(400, f"refers to {match.group(0)}, which no message in this request holds",
                               f"messages[{last}]")


def _message(raw: Any, where: str, sources: MediaSources) -> Message:
    if not isinstance(raw, dict):
        raise RequestError(400, "must be an object", where)
    role = _ROLES.get(raw.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise RequestError(400, f"role {clean_text(str(raw.get('role')))!r} is not supported; use system, user or "
                                "assistant", f"{where}.role")
    texts, media = _content(raw.get("content"), f"{where}.content", role, sources)
    if role == "assistant":
        media += _returned_media(raw, where, sources)
    if role == "system" and media:
        raise RequestError(400, "system messages cannot hold media", where)
    text = "\n".join(t for t in texts if t)
    if len(text) > sources.caps.max_text_chars:
        raise RequestError(413, f"{len(text)} characters exceed the {sources.caps.max_text_chars} cap "
                                "(caps.max_text_chars)", where)
    if len(media) > sources.caps.max_attachments:
        raise RequestError(413, f"{len(media)} media items exceed the cap of {sources.caps.max_attachments}", where)
    return Message(role=role, text=text, media=media)


def _content(content: Any, where: str, role: str, sources: MediaSources) -> tuple[list[str], list[Media]]:
    """Texts and media of a string or a list of content parts, in order."""
    if content is None:
        return [], []
    if isinstance(content, str):
        return [clean_text(content)], []
    if not isinstance(content, list):
        raise RequestError(400, "must be a string or a list of content parts", where)
    texts: list[str] = []
    media: list[Media] = []
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal"):
            value = part.get(kind)
            if not isinstance(value, str):
                raise RequestError(400, f"a {kind} part needs a string '{kind}'", at)
            texts.append(clean_text(value))
        elif role != "user" and kind is not None:
            raise RequestError(400, f"{role} content holds only text parts, not {clean_text(str(kind))!r}", at)
        else:
            media.append(_part_media(part, at, sources))
    return texts, media


def _part_media(part: Any, at: str, sources: MediaSources) -> Media:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in _URL_PARTS:
        return _from_url(_url_of(part.get(kind), f"{at}.{kind}"), _URL_PARTS[kind], f"{at}.{kind}", sources)
    if kind == "input_audio":
        body = _object(part.get("input_audio"), f"{at}.input_audio")
        fmt = body.get("format")
        name = f"input_audio.{fmt}" if isinstance(fmt, str) and fmt.isalnum() else "input_audio"
        data = _b64(body.get("data"), f"{at}.input_audio.data", sources.caps)
        return _from_bytes(data, name, Modality.AUDIO, f"{at}.input_audio", sources)
    if kind == "file":
        body = _object(part.get("file"), f"{at}.file")
        if body.get("file_data") is None:
            raise RequestError(400, "only inline file_data is supported (no file_id uploads)", f"{at}.file")
        name = str(body["filename"]) if isinstance(body.get("filename"), str) else "file"
        raw = body["file_data"]
        data = (_data_url(raw, f"{at}.file.file_data", sources.caps) if isinstance(raw, str)
                and raw.startswith("data:") else _b64(raw, f"{at}.file.file_data", sources.caps))
        return _from_bytes(data, clean_text(name), None, f"{at}.file", sources)
    shown = clean_text(str(kind)) if kind is not None else None
    raise RequestError(400, f"unknown content part type {shown!r}; use text, image_url, input_audio, file, "
                            "video_url or audio_url", at)


def _returned_media(raw: dict[str, Any], where: str, sources: MediaSources) -> list[Media]:
    """Media an assistant message carries as the server returned it: images, audio (also by id alone), videos.
    ``audio`` repeats the first of ``audios``, so it is read only when ``audios`` is absent."""
    fields = [("images", Modality.IMAGE), ("audios", Modality.AUDIO), ("videos", Modality.VIDEO)]
    if raw.get("audios") is None and raw.get("audio") is not None:
        fields[1] = ("audio", Modality.AUDIO)
    out: list[Media] = []
    for field, modality in fields:
        items = raw.get(field) or []
        items = [items] if field == "audio" else items
        if not isinstance(items, list):
            raise RequestError(400, "must be a list", f"{where}.{field}")
        for i, item in enumerate(items):
            at = f"{where}.{field}" if field == "audio" else f"{where}.{field}[{i}]"
            out.append(_returned_entry(item, modality, at, sources))
    return out


def _returned_entry(entry: Any, modality: Modality, at: str, sources: MediaSources) -> Media:
    body = _object(entry, at)
    if modality is not Modality.AUDIO:
        key = "image_url" if modality is Modality.IMAGE else "video_url"
        return _from_url(_url_of(body.get(key) or body.get("url"), f"{at}.{key}"), modality, at, sources)
    if isinstance(body.get("data"), str) and body["data"]:
        return _from_bytes(_b64(body["data"], f"{at}.data", sources.caps), "audio.wav", modality, at, sources)
    for key in ("url", "id"):
        if isinstance(body.get(key), str) and body[key]:
            ref = body[key]
            if key == "id" and (sources.resolve is None or sources.resolve(ref) is None):
                raise RequestError(400, f"unknown or expired audio id {clean_text(ref)!r}", f"{at}.id")
            return _from_url(ref, modality, at, sources)
    raise RequestError(400, "an audio entry needs data, url or id", at)


def _object(value: Any, at: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(400, "must be an object", at)
    return value


def _url_of(value: Any, at: str) -> str:
    """``{"url": ...}`` (OpenAI) or a bare string (some clients)."""
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise RequestError(400, "needs a url string", at)
    return url


def _b64(value: Any, at: str, caps: Caps) -> bytes:
    """Strict base64 (whitespace allowed), refused over the file cap before it is decoded."""
    if not isinstance(value, str) or not value:
        raise RequestError(400, "needs a base64 string", at)
    if len(value) * 3 // 4 > caps.max_file_bytes:
        raise RequestError(413, f"about {len(value) * 3 // 4:,} bytes exceed the {caps.max_file_bytes:,} byte cap "
                                "(caps.max_file_bytes)", at)
    try:
        return base64.b64decode(re.sub(r"\s+", "", value), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "invalid base64", at) from None


def _data_url(url: str, at: str, caps: Caps) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise RequestError(400, "malformed data: URL (no comma)", at)
    if header.endswith(";base64"):
        return _b64(payload, at, caps)
    data = unquote_to_bytes(payload)
    if len(data) > caps.max_file_bytes:
        raise RequestError(413, f"{len(data):,} bytes exceed the {caps.max_file_bytes:,} byte cap", at)
    return data


def _from_url(url: str, modality: Modality, at: str, sources: MediaSources) -> Media:
    """data: URLs always; the caller's own URLs/ids via ``resolve``; http(s) only with ``fetch``; paths and
    ``file://`` only under ``allowed_root``."""
    if url.startswith("data:"):
        return _from_bytes(_data_url(url, at, sources.caps), f"{modality.label}_upload", modality, at, sources)
    own = sources.resolve(url) if sources.resolve is not None else None
    if own is not None:
        return _from_file(own, own.parent, modality, at, sources)
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if sources.fetch is None:
            raise RequestError(400, "remote URLs are not fetched here (the server allows them with "
                                    "--allow-remote-media); send the media inline as a data: URL", at)
        return _from_bytes(sources.fetch(url), Path(urlsplit(url).path).name or "remote", modality, at, sources)
    if sources.allowed_root is None or scheme not in ("", "file"):
        raise RequestError(400, f"URL scheme {clean_text(scheme or 'path')!r} is not accepted; send a data: URL",
                           at)
    path = Path(unquote(urlsplit(url).path)) if scheme == "file" else Path(url)
    return _from_file(path if path.is_absolute() else sources.allowed_root / path, sources.allowed_root, modality,
                      at, sources)


def _from_file(path: Path, root: Path, modality: Modality, at: str, sources: MediaSources) -> Media:
    caps = sources.caps.model_copy(update={"allowed_roots": [root]})
    try:
        return load_media(path, caps, modality)
    except MediaError as err:
        raise _media_error(err, at) from None


def _from_bytes(data: bytes, name: str, modality: Modality | None, at: str, sources: MediaSources) -> Media:
    try:
        return media_from_bytes(data, name, sources.caps, sources.directory, modality)
    except MediaError as err:
        raise _media_error(err, at) from None


def _media_error(err: MediaError, at: str) -> RequestError:
    return RequestError(413 if err.group.startswith("over caps.") else 400, str(err), at)


def http_fetcher(max_bytes: int, timeout_s: float) -> Callable[[str], bytes]:
    """An http(s) reader for ``MediaSources.fetch``: at most ``max_bytes`` within ``timeout_s`` in total,
    redirects only to http(s)."""

    class _Redirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
            if urlsplit(newurl).scheme.lower() not in ("http", "https"):
                raise urllib.error.URLError(f"redirect to {newurl!r} refused")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    opener = urllib.request.build_opener(_Redirects)

    def fetch(url: str) -> bytes:
        deadline = time.monotonic() + timeout_s
        chunks, size = [], 0
        try:
            with opener.open(url, timeout=timeout_s) as response:
                while chunk := response.read(1 << 16):
                    size += len(chunk)
                    if size > max_bytes:
                        raise RequestError(413, f"remote media is over the {max_bytes:,} byte cap", url)
                    if time.monotonic() > deadline:
                        raise RequestError(400, f"remote media took over {timeout_s:g} s", url)
                    chunks.append(chunk)
        except (OSError, ValueError) as err:
            if isinstance(err, RequestError):
                raise
            raise RequestError(400, f"cannot fetch: {err}", clean_text(url)) from None
        return b"".join(chunks)

    return fetch


# ------------------------------------------------------------------------------------------------ outbound


def _entry(media: Media, encode: Callable[[Media], Encoded], transcript: str) -> dict[str, Any]:
    """One response entry; every entry carries its conversation id as ``anyverse_id``."""
    encoded = encode(media)
    if media.modality is Modality.AUDIO:
        entry: dict[str, Any] = {"id": encoded.handle, "transcript": transcript, "expires_at": encoded.expires_at,
                                 "format": media.format}
        if encoded.url.startswith("data:"):
            entry["data"] = encoded.url.partition(",")[2]
        else:
            entry["url"] = encoded.url
        return {**entry, "anyverse_id": media.id}
    key = "image_url" if media.modality is Modality.IMAGE else "video_url"
    return {"type": key, key: {"url": encoded.url}, "anyverse_id": media.id}


def media_fields(items: Iterable[tuple[Media, str]], encode: Callable[[Media], Encoded]) -> dict[str, Any]:
    """``message`` fields for generated ``(media, prompt)`` pairs: ``images``, ``audio`` (the first) + ``audios``,
    ``videos``; fields with nothing in them are left out."""
    fields: dict[str, list[dict[str, Any]]] = {}
    for media, prompt in items:
        fields.setdefault(_FIELDS[media.modality], []).append(_entry(media, encode, prompt))
    out: dict[str, Any] = dict(fields)
    if "audios" in fields:
        out["audio"] = fields["audios"][0]
    return out


def media_delta(media: Media, prompt: str, encode: Callable[[Media], Encoded]) -> dict[str, Any]:
    """A streaming ``delta`` holding one item: ``{"images": [...]}``, ``{"audio": {...}}`` or ``{"videos": [...]}``."""
    entry = _entry(media, encode, prompt)
    return {"audio": entry} if media.modality is Modality.AUDIO else {_FIELDS[media.modality]: [entry]}
