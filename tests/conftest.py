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
