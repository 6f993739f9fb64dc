"""Every test runs offline, single-threaded, with tiny weights built once per session in a private cache."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # as the CLI sets it: library chatter is not an error line
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def anyverse_home(tmp_path_factory: pytest.TempPathFactory):
    """Tiny weights and caches go to a per-session directory, shared by all tests of the session."""
    home = os.environ.get("ANYVERSE_TEST_HOME") or str(tmp_path_factory.mktemp("anyverse_home"))
    os.environ["ANYVERSE_HOME"] = home
    return home


@pytest.fixture(scope="session")
def sample_media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Small valid media as bytes, for API-style inputs: ``png``, ``wav`` (0.2 s) and ``mp4`` (4 frames)."""
    import io

    import numpy as np
    import soundfile as sf
    from PIL import Image

    from anyverse.media import save_video

    png, wav = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(png, format="PNG")
    sf.write(wav, 0.3 * np.sin(np.arange(3200) / 5.0), 16000, format="WAV")
    video = save_video(np.full((4, 16, 16, 3), 0.5, np.float32), 8, tmp_path_factory.mktemp("sample_video"))
    return {"png": png.getvalue(), "wav": wav.getvalue(), "mp4": video.path.read_bytes()}
