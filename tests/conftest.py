"""Every test runs offline, single-threaded, with tiny weights built once per session in a private cache."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # as the CLI sets it: library chatter is not an error line
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``last`` run after all others."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def anyverse_home(tmp_path_factory: pytest.TempPathFactory):
    """Tiny weights and caches go to a per-session directory, shared by all tests of the session."""
    home = os.environ.get("ANYVERSE_TEST_HOME") or str(tmp_path_factory.mktemp("anyverse_home"))
    os.environ["ANYVERSE_HOME"] = home
    return home


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small file per input modality, written by the project's own writers."""
    from anyverse.media import save_audio, save_image, save_video

    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    tone = np.sin(np.linspace(0, 440 * 2 * np.pi, 16000)).astype(np.float32) * 0.5
    return {
        "image": save_image(rng.random((40, 48, 3)), folder).path,
        "audio": save_audio(tone, 16000, folder).path,
        "video": save_video(rng.random((8, 32, 32, 3)), 8, folder).path,
    }


@pytest.fixture(scope="session")
def sample_media(inputs: dict[str, Path]) -> dict[str, bytes]:
    """The same files as bytes, for API-style inputs: ``png``, ``wav`` and ``mp4``."""
    return {"png": inputs["image"].read_bytes(), "wav": inputs["audio"].read_bytes(),
            "mp4": inputs["video"].read_bytes()}


@pytest.fixture(scope="session")
def batch_media(inputs: dict[str, Path]) -> dict[str, Path]:
    """``inputs`` plus a corrupt PNG beside them (batch jobs name their inputs relative to that folder)."""
    broken = inputs["image"].parent / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return {**inputs, "corrupt": broken}
