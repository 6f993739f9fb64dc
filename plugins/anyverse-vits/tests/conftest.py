"""Offline, single-threaded, tiny weights in a private cache: as anyverse's own tests run."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def anyverse_home(tmp_path_factory: pytest.TempPathFactory) -> str:
    home = os.environ.get("ANYVERSE_TEST_HOME") or str(tmp_path_factory.mktemp("anyverse_home"))
    os.environ["ANYVERSE_HOME"] = home
    return home
