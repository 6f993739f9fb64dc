"""OpenAI Batch API lines: ``{"custom_id", "method", "url", "body"}`` in, ``{"id", "custom_id", "response",
"error"}`` out, with generated media as ``message.images`` / ``audio`` / ``videos`` file paths.

Messages go through the content-part parser serve uses (:mod:`anyverse.openai_parts`); paths and ``file://``
URLs are read only under the job root. The body's ``model`` is recorded and ignored: the loaded profile runs.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anyverse.batch.jobs import OPENAI_URLS, JobError, JobOptions, Task, digest
from anyverse.config import Caps, anyverse_home
from anyverse.openai_parts import Encoded, MediaSources, RequestError, media_fields, parse_chat
from anyverse.types import Media

if TYPE_CHECKING:
    from anyverse.batch.worker import JobRun, Settings

LINE_KEYS = {"custom_id", "method", "url", "body"}


def parse_openai_line(value: dict[str, Any], line: int, root: Path, caps: Caps | None = None) -> Task:
    """Validate one OpenAI batch line (media decoded through the caps) into a Task."""
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 256:
        raise JobError("custom_id must be a non-empty string of at most 256 characters")
    unknown = sorted(set(value) - LINE_KEYS)
    if unknown:
        raise JobError(f"unknown field(s) {', '.join(unknown)}; a line has custom_id, method, url and body",
                       custom_id)
    if value.get("method") != "POST" or value.get("url") not in OPENAI_URLS:
        raise JobError("only POST /v1/chat/completions lines are supported", custom_id)
    body = value.get("body")
    if not isinstance(body, dict):
        raise JobError("body must be an object", custom_id)
    seed = body.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise JobError("body.seed must be an integer", custom_id)
    sources = MediaSources(caps=caps or Caps(), directory=anyverse_home() / "uploads", allowed_root=root)
    try:
        chat = parse_chat(body.get("messages"), sources, body.get("modalities"))
    except RequestError as err:
        raise JobError(f"body.{err.message}", custom_id) from None
    model = body.get("model") if isinstance(body.get("model"), str) else None
    return Task(line=line, id=custom_id, format="openai", prompt="", inputs=[], outputs=chat.require,
                options=JobOptions(seed=seed), digest=digest(value), messages=chat.messages, model=model)


def openai_record(job: JobRun, settings: Settings) -> dict[str, Any]:
    """The job's OpenAI batch output line; anyverse's own bookkeeping (status, reason, timings) rides along."""
    from anyverse.batch.worker import bookkeeping

    tag = hashlib.sha256(job.id.encode()).hexdigest()[:24]
    record: dict[str, Any] = {"id": f"batch_req_{tag}", "custom_id": job.id, "response": None, "error": None,
                              "anyverse": {**bookkeeping(job), "notices": job.notices}}
    if job.error is not None or job.reply is None:
        record["error"] = {"code": job.reason, "message": job.error}
        return record

    def as_path(media: Media) -> Encoded:
        return Encoded(url=str(media.path.relative_to(settings.out)), handle=str(media.id))

    message = {"role": "assistant", "content": job.reply.text,
               **media_fields(((p.media, p.request.prompt or "") for p in job.made), as_path)}
    completion = len(job.reply.ids)
    record["response"] = {"status_code": 200, "request_id": f"req_{tag}", "body": {
        "id": f"chatcmpl-{tag}", "object": "chat.completion", "created": int(time.time()),
        "model": job.task.model if job.task and job.task.model else settings.profile,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
                  "total_tokens": job.prompt_tokens + completion}}}
    return record
