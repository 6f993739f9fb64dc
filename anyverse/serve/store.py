"""The server's media: content-addressed files handed out as data, signed expiring URLs, or audio ids."""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import mimetypes
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from anyverse.openai_parts import Encoded, RequestError
from anyverse.types import Media, Modality

_ROUTE = "/v1/media/"
_NAME = re.compile(r"[0-9a-f]{16}\.[a-z0-9]{2,4}")  # the content-addressed names anyverse.media writes


class MediaStore:
    """Files live in ``directory`` under program-chosen names; a URL to one carries ``exp`` and an HMAC ``sig``
    so a browser can load it without a header, and both URLs and audio ids stop working after ``ttl`` seconds."""

    def __init__(self, directory: Path, ttl: float):
        self.directory = directory.resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ttl = ttl
        self._secret = secrets.token_bytes(32)
        self._handles: dict[str, tuple[str, float]] = {}  # audio id -> (file name, expiry)
        self._lock = threading.Lock()

    def _sign(self, name: str, expires: int) -> str:
        return hmac.new(self._secret, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def url(self, media: Media, base_url: str) -> tuple[str, int]:
        """Signed URL of a stored file and when it expires (unix seconds)."""
        expires = math.ceil(time.time() + self.ttl)
        name = media.path.name
        return f"{base_url.rstrip('/')}{_ROUTE}{name}?exp={expires}&sig={self._sign(name, expires)}", expires

    def encoder(self, base_url: str, inline: frozenset[Modality]) -> Callable[[Media], Encoded]:
        """``openai_parts`` encoder: ``inline`` modalities as data: URLs, the rest as signed URLs; every item gets an
        audio-style id that resolves back to its file until it expires."""

        def encode(media: Media) -> Encoded:
            url, expires = self.url(media, base_url)
            if media.modality in inline:
                mime = mimetypes.guess_type(media.path.name)[0] or "application/octet-stream"
                url = f"data:{mime};base64,{base64.b64encode(media.path.read_bytes()).decode()}"
            handle = f"{media.id or 'media'}_{media.sha256[:16]}"
            with self._lock:
                if len(self._handles) > 10_000:  # drop expired ids now and then
                    now = time.time()
                    self._handles = {k: v for k, v in self._handles.items() if v[1] >= now}
                self._handles[handle] = (media.path.name, expires)
            return Encoded(url=url, handle=handle, expires_at=expires)

        return encode

    def file(self, name: str, exp: str | None, sig: str | None) -> Path:
        """The file behind ``/v1/media/{name}`` (``sig`` None: the caller checked the API key instead)."""
        path = self.directory / name
        if not _NAME.fullmatch(name) or not path.is_file():  # media only, never the turn log beside them
            raise RequestError(404, f"no media named {name!r}")
        if sig is not None:
            if not (exp or "").isdigit() or not hmac.compare_digest(sig, self._sign(name, int(exp or 0))):
                raise RequestError(401, f"invalid signature for media {name!r}")
            if int(exp or 0) < time.time():
                raise RequestError(404, f"the URL of media {name!r} expired; ask again for a new one")
        return path

    def resolve(self, ref: str) -> Path | None:
        """A media URL or audio id this server handed out -> its file (expired ones are refused, naming them);
        None when ``ref`` is not one of ours."""
        with self._lock:
            known = self._handles.get(ref)
        if known is not None:
            if known[1] < time.time():
                raise RequestError(400, f"audio id {ref!r} expired", "messages")
            return self.directory / known[0]
        parts = urlsplit(ref)
        if parts.scheme not in ("http", "https") or not parts.path.startswith(_ROUTE):
            return None
        query = parse_qs(parts.query)
        sig = (query.get("sig") or [""])[0]
        try:
            return self.file(parts.path.removeprefix(_ROUTE), (query.get("exp") or [""])[0], sig)
        except RequestError as err:
            raise RequestError(400, err.message, "messages") from None
