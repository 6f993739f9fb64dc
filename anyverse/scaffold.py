"""``anyverse generators new NAME``: write a ready plugin package, as the ``llm-plugin`` template does for llm.

The package has its own pyproject (with the entry point), one module holding a working generator on
``BaseGenerator`` (procedural media, no weights: replace ``load`` and ``generate_one`` with a model), a README and a
test that passes against the installed anyverse and the tiny profile.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from anyverse.types import OUTPUT_MODALITIES, Modality

# Each modality's example: its own option, and how it makes media from the seed (arrays as GeneratedMedia has them).
MEDIA = {
    Modality.IMAGE: ('size: int = Field(default=32, ge=8, le=1024, description="image side in pixels")',
                     "pixels = rng.random((options.size, options.size, 3), dtype=np.float32)\n"
                     "        return GeneratedMedia(self.modality, pixels)"),
    Modality.VIDEO: ('size: int = Field(default=32, ge=8, le=1024, description="frame side in pixels")',
                     "frames = rng.random((options.frames or 4, options.size, options.size, 3), dtype=np.float32)\n"
                     "        return GeneratedMedia(self.modality, frames, fps=8)"),
    Modality.AUDIO: ('pitch: float = Field(default=440.0, gt=20.0, le=8000.0, description="tone frequency in Hz")',
                     "t = np.arange(int(16000 * (options.seconds or 0.25))) / 16000\n"
                     "        wave = 0.5 * np.sin(2 * np.pi * options.pitch * t) + 0.01 * rng.standard_normal(t.size)\n"
                     "        return GeneratedMedia(self.modality, wave.astype(np.float32), sample_rate=16000)"),
}

MODULE = '''"""$title: an anyverse generator plugin ($modality). Put your model in ``load`` and ``generate_one``."""

from __future__ import annotations

import threading
from typing import ClassVar

import numpy as np
from pydantic import Field

from anyverse.plugins import BaseGenerator, GeneratedMedia, Options, Progress
from anyverse.types import MediaRequest, Modality


class ${cls}Options(Options):
    """Uniform options (seed, steps, ...) plus this plugin's own, validated wherever they come from."""

    $option


class ${cls}Generator(BaseGenerator):
    """$title: procedural $modality from the request's seed (a stand-in for a model)."""

    name: ClassVar[str] = "$name"
    modality: ClassVar[Modality] = Modality.$upper
    capabilities: ClassVar[frozenset[str]] = frozenset({"generate"})
    Options: ClassVar[type[${cls}Options]] = ${cls}Options
    _model: object | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        self._model = object()  # load weights here (from self.config.path, or build tiny ones)

    def unload(self) -> None:
        self._model = None

    def generate_one(self, request: MediaRequest, options: ${cls}Options, source: GeneratedMedia | None,
                     progress: Progress | None, cancel: threading.Event | None) -> GeneratedMedia:
        rng = np.random.default_rng(options.seed)
        if progress is not None:
            progress(1, 1)
        $media
'''

PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$package"
version = "0.1.0"
description = "$title: a $modality generator plugin for anyverse"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["anyverse"]

[project.entry-points."anyverse.generators"]
$name = "$module:${cls}Generator"

[tool.setuptools]
py-modules = ["$module"]
'''

README = '''# $package

An anyverse generator plugin: `$name` makes $modality.

    pip install -e .                      # registers the entry point
    anyverse generators list              # shows $name
    anyverse generate --generator $name "a prompt" --option seed=1 --set generators.$name.tiny={}
    python -m pytest tests                # the plugin's own test

Replace `load` and `generate_one` in `$module.py` with your model; add fields to `${cls}Options` for its options.
'''

TEST = '''"""$name through anyverse's public API on the tiny profile: listed, and generating with its options."""

from __future__ import annotations

import pytest

from anyverse.catalog import list_plugins
from anyverse.session import Anyverse


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ANYVERSE_HOME", str(tmp_path / "home"))
    return Anyverse.from_profile("tiny", ["generators.$name.tiny={}"], output_dir=tmp_path / "out")


def test_the_entry_point_is_listed():
    assert any(row["name"] == "$name" and row["modality"] == "$modality" for row in list_plugins())


def test_generates_with_its_own_options(session):
    made = session.generate("a test prompt", generator="$name", options={"seed": 1, "$option_name": $option_value})
    assert made.media.modality.value == "$modality" and made.media.path.is_file()
    assert made.request.generator == "$name"


def test_a_bad_option_names_the_plugin_and_field(session):
    with pytest.raises(ValueError, match=r"$name.*$option_name"):
        session.generate("a test prompt", generator="$name", options={"$option_name": -1})
'''


def write_plugin(name: str, modality: Modality, directory: Path) -> Path:
    """Write package ``anyverse-NAME`` into ``directory``; refuses a bad name or an existing folder."""
    if not re.fullmatch(r"[a-z][a-z0-9-]{1,40}", name):
        raise ValueError(f"generators new {name!r}: a name is lower-case letters, digits and '-', starting a letter")
    if modality not in OUTPUT_MODALITIES:
        raise ValueError(f"generators new: --modality {modality.value} cannot be generated; use image, video or audio")
    package = f"anyverse-{name}"
    root = directory / package
    if root.exists():
        raise ValueError(f"{root}: already exists; choose another name or directory")
    module = package.replace("-", "_")
    option, media = MEDIA[modality]
    option_name = option.split(":")[0]
    values = {
        "name": name, "package": package, "module": module, "modality": modality.value,
        "upper": modality.name, "cls": "".join(part.title() for part in name.split("-")),
        "title": name.replace("-", " ").title(), "media": media, "option": option, "option_name": option_name,
        "option_value": "16" if option_name == "size" else "220.0",
    }
    files = {f"{module}.py": MODULE, "pyproject.toml": PYPROJECT, "README.md": README,
             f"tests/test_{module}.py": TEST}
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(template).substitute(values))
    return root
