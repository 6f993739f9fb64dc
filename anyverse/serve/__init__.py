"""``anyverse serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the optional extra ``anyverse[serve]``).

The app lives in :mod:`anyverse.serve.app`; these entry points import it (and torch) only when they need it.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anyverse.serve.app import ServeSettings

__all__ = ["check_host", "run", "settings"]


def check_host(host: str, api_key: str | None) -> None:
    """A host other than loopback is reachable from other machines: it needs an API key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"--host {host} is reachable from other machines: set --api-key or ANYVERSE_API_KEY")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings(profile: str, overrides: list[str], checkpoint: Path | None, out: Path,
             **options: object) -> ServeSettings:
    """Resolve the model config now (a bad profile fails at start); the model itself loads on the first chat."""
    from anyverse.checkpoint import checkpoint_config
    from anyverse.config import load_config
    from anyverse.serve.app import ServeSettings
    from anyverse.session import Anyverse

    config, check = checkpoint_config(checkpoint, overrides) if checkpoint else (load_config(profile, overrides), None)
    out = Path(out)
    return ServeSettings(config=config, media_dir=out, make_session=lambda: Anyverse(config, out, check), **options)  # type: ignore[arg-type]


def run(server: ServeSettings, host: str, port: int) -> None:
    """Serve until interrupted."""
    import uvicorn

    from anyverse.serve.app import create_app

    check_host(host, server.api_key)
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
