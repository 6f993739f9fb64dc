"""Find real weights locally, or build tiny random ones once; never fall back silently.

Real components name a local directory or a hub id that must already be in the HF cache (nothing is downloaded at
run time). Tiny components are built from a config by a builder, saved with ``save_pretrained``/safetensors, and
then loaded through the same path as real weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from anyverse.config import Component, anyverse_home, tiny_dir

log = logging.getLogger(__name__)

_COMPLETE = ".anyverse-complete"


class MissingWeightsError(RuntimeError):
    """Real weights are not on this machine. ``missing`` lists one line per piece: what, where, how to get it."""

    def __init__(self, missing: list[str]):
        self.missing = missing
        lines = "\n".join(f"  - {m}" for m in missing)
        super().__init__(f"missing model weights (nothing is downloaded at run time):\n{lines}")


def expand(path: str) -> Path:
    """Expand ``~``, ``${ANYVERSE_HOME}`` (defaulting to the anyverse cache) and other env vars in a path."""
    return Path(os.path.expandvars(path.replace("${ANYVERSE_HOME}", str(anyverse_home())))).expanduser()


def locate(path: str, what: str, how_to_get: str) -> Path:
    """Return a local directory for ``path`` (a dir, or a hub id already in the HF cache) or raise."""
    local = expand(path)
    if local.exists():
        return local
    if path.count("/") == 1 and not path.startswith(("/", ".", "~", "$")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(path, local_files_only=True))
        except Exception:  # any miss in the offline cache means the same thing to the user
            pass
    raise MissingWeightsError([f"{what}: {path!r} not found locally or in the HF cache. {how_to_get}"])


def collect_missing(checks: list[Callable[[], object]]) -> None:
    """Run every check and raise one error listing all missing pieces, not just the first."""
    missing: list[str] = []
    for check in checks:
        try:
            check()
        except MissingWeightsError as err:
            missing.extend(err.missing)
    if missing:
        raise MissingWeightsError(missing)


def materialize_tiny(name: str, component: Component, build: Callable[[Path], None], extra: dict | None = None) -> Path:
    """Build a tiny component into the cache once (atomically), return its directory.

    ``build(directory)`` must write the component with ``save_pretrained``/safetensors so loading it exercises the
    real loading code.
    """
    assert component.tiny is not None
    target = tiny_dir(name, component.tiny, extra)
    if (target / _COMPLETE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        log.info("building tiny %s into %s", name, target)
        build(staging)
        (staging / _COMPLETE).touch()
        if target.exists() and not (target / _COMPLETE).exists():  # a leftover of an interrupted build; a complete
            shutil.rmtree(target)  # one is another process's finished build, which it may be reading: keep it
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / _COMPLETE).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def component_dir(name: str, component: Component, build: Callable[[Path], None], how_to_get: str) -> Path:
    """Directory to ``from_pretrained`` from: tiny ones are built on first use, real ones must exist."""
    if component.tiny is not None:
        return materialize_tiny(name, component, build)
    assert component.path is not None
    return locate(component.path, name, how_to_get)
