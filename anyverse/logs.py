"""The conversation log: every exchange of ``chat`` and ``run`` in one SQLite file, as ``llm`` logs do.

A conversation row keeps what is needed to continue it (profile, checkpoint, overrides, the resolved config and
its fingerprint, and the base model's fingerprint that decides compatibility); an exchange row keeps the user
message and the reply as pydantic JSON (media by path and sha256, requests with their seeds) plus timings.
WAL mode and a busy timeout let two processes share the file; a file that is not a usable database is reported
and never overwritten.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anyverse.media import FORMAT_EXTENSIONS
from anyverse.types import Media, Message

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, created REAL NOT NULL, updated REAL NOT NULL, profile TEXT NOT NULL,
    checkpoint TEXT, overrides TEXT NOT NULL, config TEXT NOT NULL, config_fingerprint TEXT NOT NULL,
    model_fingerprint TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS exchanges (
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL, created REAL NOT NULL, user TEXT NOT NULL, assistant TEXT NOT NULL,
    timings TEXT NOT NULL, PRIMARY KEY (conversation_id, position)
);
"""


class LogError(ValueError):
    """The log cannot be used (corrupt, locked, unknown id, incompatible); one line saying what to do."""


@dataclass(frozen=True)
class Conversation:
    id: str
    created: float
    updated: float
    profile: str
    checkpoint: str | None
    overrides: list[str]
    config: dict[str, Any]
    config_fingerprint: str
    model_fingerprint: dict[str, Any]
    exchanges: int = 0

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "updated": self.updated, "profile": self.profile,
                "checkpoint": self.checkpoint, "overrides": self.overrides, "exchanges": self.exchanges,
                "config_fingerprint": self.config_fingerprint}


class ConversationLog:
    """One SQLite file of conversations; each method is one short transaction."""

    def __init__(self, path: Path):
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.executescript(SCHEMA)
        except sqlite3.Error as err:
            raise self._error(err) from None

    def _error(self, err: sqlite3.Error) -> LogError:
        if "locked" in str(err) or "busy" in str(err):
            return LogError(f"{self.path}: the conversation log is locked by another process ({err}); try again")
        return LogError(f"{self.path}: the conversation log is unreadable ({err}); it was left untouched: move it "
                        "aside to start a new log, or pass --no-log")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=10)
        except sqlite3.Error as err:
            raise self._error(err) from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            with db:  # commits, or rolls back on an exception
                yield db
        except sqlite3.Error as err:
            raise self._error(err) from None
        finally:
            db.close()

    # ---- conversations

    def create(self, profile: str, checkpoint: str | None, overrides: list[str], config: dict[str, Any],
               config_fingerprint: str, model_fingerprint: dict[str, Any]) -> str:
        now = time.time()
        cid = f"{int(now * 1000):012x}{secrets.token_hex(3)}"  # sorts by creation time
        with self._connect() as db:
            db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (cid, now, now, profile, checkpoint, json.dumps(overrides), json.dumps(config),
                        config_fingerprint, json.dumps(model_fingerprint, sort_keys=True)))
        return cid

    def conversations(self, limit: int | None = None) -> list[Conversation]:
        """Newest first."""
        query = ("SELECT c.*, (SELECT COUNT(*) FROM exchanges e WHERE e.conversation_id = c.id) FROM conversations c"
                 " ORDER BY c.updated DESC, c.id DESC" + (f" LIMIT {int(limit)}" if limit else ""))
        with self._connect() as db:
            return [_conversation(row) for row in db.execute(query)]

    def latest(self) -> Conversation:
        found = self.conversations(limit=1)
        if not found:
            raise LogError(f"{self.path}: no conversation to continue yet; start one without -c")
        return found[0]

    def get(self, cid: str) -> Conversation:
        with self._connect() as db:
            row = db.execute("SELECT c.*, (SELECT COUNT(*) FROM exchanges e WHERE e.conversation_id = c.id) "
                             "FROM conversations c WHERE c.id = ?", (cid,)).fetchone()
        if row is None:
            raise LogError(f"conversation {cid!r}: not in {self.path} (see `anyverse logs list`)")
        return _conversation(row)

    def remove(self, cid: str) -> None:
        self.get(cid)
        with self._connect() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (cid,))

    # ---- exchanges

    def history(self, cid: str) -> list[Message]:
        with self._connect() as db:
            rows = db.execute("SELECT user, assistant FROM exchanges WHERE conversation_id = ? ORDER BY position",
                              (cid,)).fetchall()
        return [Message.model_validate_json(text) for row in rows for text in row]

    def exchanges(self, cid: str) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute("SELECT position, created, user, assistant, timings FROM exchanges "
                              "WHERE conversation_id = ? ORDER BY position", (cid,)).fetchall()
        return [{"position": p, "created": c, "user": json.loads(u), "assistant": json.loads(a),
                 "timings": json.loads(t)} for p, c, u, a, t in rows]

    def append(self, cid: str, user: Message, assistant: Message, timings: dict[str, float]) -> None:
        now = time.time()
        with self._connect() as db:
            position = db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM exchanges WHERE conversation_id = ?",
                                  (cid,)).fetchone()[0]
            db.execute("INSERT INTO exchanges VALUES (?, ?, ?, ?, ?, ?)",
                       (cid, position, now, user.model_dump_json(), assistant.model_dump_json(),
                        json.dumps(timings)))
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, cid))

    def pop(self, cid: str) -> None:
        """Forget the last exchange (``/undo``, ``/retry``)."""
        with self._connect() as db:
            db.execute("DELETE FROM exchanges WHERE conversation_id = ? AND position = "
                       "(SELECT MAX(position) FROM exchanges WHERE conversation_id = ?)", (cid, cid))


def _conversation(row: tuple) -> Conversation:
    cid, created, updated, profile, checkpoint, overrides, config, fingerprint, model, count = row
    return Conversation(id=cid, created=created, updated=updated, profile=profile, checkpoint=checkpoint,
                        overrides=json.loads(overrides), config=json.loads(config), config_fingerprint=fingerprint,
                        model_fingerprint=json.loads(model), exchanges=count)


def check_compatible(conversation: Conversation, model_fingerprint: dict[str, Any]) -> None:
    """Refuse to continue a conversation under another encoder, LLM or vocabulary, naming what differs."""
    logged = conversation.model_fingerprint
    differs = [f"{key} {logged.get(key)!r} -> {model_fingerprint.get(key)!r}"
               for key in sorted(set(logged) | set(model_fingerprint)) if logged.get(key) != model_fingerprint.get(key)]
    if differs:
        raise LogError(f"conversation {conversation.id}: made with another model ({'; '.join(differs)}); continue it "
                       "with its own profile, or start a new conversation")


def keep_media(media: Media, store: Path) -> Media:
    """Copy an attachment into the content-addressed media store, so the log outlives the user's file."""
    store.mkdir(parents=True, exist_ok=True)
    kept = store / f"{media.sha256[:16]}{FORMAT_EXTENSIONS[media.format]}"
    if not kept.exists():
        tmp = store / f".tmp-{secrets.token_hex(4)}"
        shutil.copyfile(media.path, tmp)
        tmp.replace(kept)
    return media.model_copy(update={"path": kept.resolve()})
