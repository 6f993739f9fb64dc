"""The installed package, not the source tree: a non-editable wheel must carry prompts, profiles and generators."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys
from importlib import metadata, resources
import anyverse, anyverse.generators
assert anyverse.__file__.startswith(sys.argv[1]), anyverse.__file__
names = {ep.name: ep for ep in metadata.entry_points(group="anyverse.generators")}
assert {"stable-diffusion", "zeroscope", "audioldm2"} <= set(names), names
assert names["zeroscope"].load().__module__ == "anyverse.generators.zeroscope"
assert (resources.files("anyverse.prompts") / "v1" / "system_meta.md").is_file()
assert (resources.files("anyverse.profiles") / "tiny.yaml").is_file()
assert resources.files("anyverse.datasets").is_dir()
assert (resources.files("anyverse.train.configs") / "accelerate" / "fsdp.yaml").is_file()
print("ok")
"""


@pytest.mark.slow
def test_wheel_installs_data_and_plugins_under_anyverse(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("anyverse-*.whl"))
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top_level == {"anyverse", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    probe = subprocess.run([sys.executable, "-c", PROBE, str(target)], capture_output=True, text=True,
                           env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert probe.stdout.strip() == "ok", probe.stderr
