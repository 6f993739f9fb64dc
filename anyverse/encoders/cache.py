"""Embedding cache keyed by (media sha256, encoder id), so training and repeated chats never encode twice.

One safetensors file per item under ``root/<encoder_id>/<sha[:2]>/<sha>.safetensors``; a different encoder id is a
different directory, so entries are never shared across weights or preprocessing versions.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

_SHA = re.compile(r"[0-9a-f]{16,128}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class EmbeddingCache:
    """Pooled embedding and tokens of one media item per file, written atomically; corrupt files count as misses."""

    def __init__(self, root: Path, encoder_id: str):
        if not _ID.fullmatch(encoder_id):
            raise ValueError(f"encoder id {encoder_id!r}: use letters, digits, '.', '_' and '-' only")
        self.root = Path(root) / encoder_id
        self.encoder_id = encoder_id
        self.hits = 0
        self.misses = 0

    def path(self, sha256: str) -> Path:
        if not _SHA.fullmatch(sha256):
            raise ValueError(f"media sha256 {sha256!r}: expected lowercase hex")
        return self.root / sha256[:2] / f"{sha256}.safetensors"

    def get(self, sha256: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(pooled [D], tokens [N, Dt])`` on CPU in the stored dtype, or None."""
        path = self.path(sha256)
        if path.is_file():
            try:
                tensors = load_file(str(path))
                self.hits += 1
                return tensors["pooled"], tensors["tokens"]
            except Exception as err:  # truncated or foreign file: re-encode and overwrite it
                log.warning("embedding cache: %s is unreadable (%s); encoding again", path, err)
        self.misses += 1
        return None

    def put(self, sha256: str, pooled: torch.Tensor, tokens: torch.Tensor) -> None:
        """Store one item's tensors (dtype kept) via a temp file and rename, so readers never see half a file."""
        path = self.path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in (("pooled", pooled),
                                                                                     ("tokens", tokens))}
        fd, tmp = tempfile.mkstemp(prefix=f".{sha256[:8]}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"encoder_id": self.encoder_id})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
