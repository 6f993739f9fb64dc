"""Generator plugins as an extension point, through the CLI and the Python API on the tiny profile: listing without
imports, info, several generators per modality chosen per request, plugin options from every source, progress and
cancel, isolation of broken plugins, ANYVERSE_PLUGINS, and `generators new` producing a package whose test passes."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from anyverse.cli.app import app
from typer.testing import CliRunner

from anyverse import plugins
from anyverse.config import load_config
from anyverse.media import save_image
from anyverse.model import system_prompt
from anyverse.plugins import GenerationCancelled
from anyverse.session import Anyverse
from anyverse.signals import SignalVocabulary
from anyverse.types import MediaProgress, Modality, RequestOptions

runner = CliRunner()
EXAMPLES = {"instruct-pix2pix": ("image", ["edit"], "anyverse-instruct-pix2pix"),
            "vits": ("audio", ["speech"], "anyverse-vits")}
PIX2PIX = ["generators.instruct-pix2pix.tiny={seed: 0}", "generators.instruct-pix2pix.options={steps: 2}"]
VITS = ["generators.vits.tiny={seed: 0}"]


def sets(overrides: list[str]) -> list[str]:
    """``--set`` options for each override."""
    return [arg for override in overrides for arg in ("--set", override)]


def python_cpu(code: str, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``code`` in a fresh interpreter; also return its CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-c", code, *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def anyverse_cli(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run the installed ``anyverse`` in a fresh process; also return its CPU seconds."""
    return python_cpu("from anyverse.cli.app import main; main()", *args, env=env)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_image(np.random.default_rng(0).random((32, 32, 3)), tmp_path_factory.mktemp("in")).path


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Anyverse:
    """Tiny profile plus both example plugins; image edits default to InstructPix2Pix."""
    overrides = [*PIX2PIX, *VITS, "generator_defaults.image.edit=instruct-pix2pix", "output.name_generators=true"]
    return Anyverse.from_profile("tiny", overrides, output_dir=tmp_path_factory.mktemp("out"))


# ---------------------------------------------------------------- finding plugins


def test_list_shows_the_installed_example_packages_without_importing_torch() -> None:
    done, cpu = anyverse_cli("generators", "list", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    for name, (modality, capabilities, package) in EXAMPLES.items():
        assert (rows[name]["modality"], rows[name]["capabilities"], rows[name]["package"]) == (
            modality, capabilities, package)
        assert rows[name]["version"] == "0.1.0" and not rows[name]["built_in"] and rows[name]["broken"] is None
    assert rows["stable-diffusion"]["configured"] == [{"name": "image", "weights": "tiny"}]
    assert rows["stable-diffusion"]["capabilities"] == ["edit", "generate"]
    probe = ("import sys; from typer.testing import CliRunner; from anyverse.cli.app import app; "
             "r = CliRunner().invoke(app, ['generators', 'list']); assert r.exit_code == 0, r.output; "
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"
    _, torch_cpu = python_cpu("import torch")  # what listing would cost if it imported a plugin: measured here,
    assert cpu < torch_cpu / 2  # so a slow machine slows both; benchmarks/plugin_list.py times it against 0.5 s


def test_info_gives_options_schema_defaults_conditioning_and_memory() -> None:
    result = runner.invoke(app, ["generators", "info", "vits", "--set", VITS[0]])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["options"]["properties"]["speaking_rate"]["exclusiveMinimum"] == 0.1
    assert info["defaults"]["speaking_rate"] == 1.0 and info["capabilities"] == ["speech"]
    assert info["conditioning"].startswith("none (meta-only") and info["memory_bytes"] > 0
    sd = json.loads(runner.invoke(app, ["generators", "info", "stable-diffusion"]).stdout)
    assert sd["conditioning"] == {"prompt_embeds": [16, 32]} and sd["defaults"]["steps"] == 2
    assert sd["accepts_source"] == ["image"] and "strength" in sd["options"]["properties"]


def test_prompt_lists_configured_generators_only_when_asked_and_trained_profiles_keep_theirs() -> None:
    def prompt(profile: str, *overrides: str) -> str:
        config = load_config(profile, list(overrides))
        return system_prompt(config, SignalVocabulary(config.output.signal_tokens))

    listed = prompt("tiny", *VITS, "output.name_generators=true")
    assert "- vits: audio (speech)" in listed and "- image: image (edit, generate)" in listed
    assert "instruct-pix2pix" not in listed  # installed but not configured in this profile
    assert "generator" not in prompt("tiny", *VITS) and "generator" not in prompt("toyworld")


# ---------------------------------------------------------------- choosing between generators


def test_requests_route_by_name_capability_source_and_default(session: Anyverse, photo: Path) -> None:
    def ran(**kwargs) -> str:  # type: ignore[no-untyped-def]
        made = session.generate("a red circle", options={"seed": 0}, **kwargs)
        assert made.media.path.is_file()
        return str(made.request.generator)

    assert ran(modality="image") == "image"  # the old one-per-modality entry is the default
    assert ran(modality="image", source=photo) == "instruct-pix2pix"  # editing: generator_defaults.image.edit
    assert ran(generator="stable-diffusion", source=photo) == "image"  # a plugin name finds its entry
    assert ran(modality="audio", generator="speech") == "vits"  # a capability: its default
    assert ran(modality="audio") == "audio"
    with pytest.raises(ValueError, match="makes audio, not image"):
        ran(modality="image", generator="vits")
    with pytest.raises(ValueError, match="unknown generator 'nope'"):
        ran(modality="image", generator="nope")


def test_cli_generate_with_generator_option_and_source(tmp_path: Path, photo: Path) -> None:
    args = ["generate", "image", "make it night", "--generator", "instruct-pix2pix", "--source", str(photo),
            "--option", "image_guidance=2.5", "--seed", "1", "--out", str(tmp_path), "--json", *sets(PIX2PIX)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    made = json.loads(result.stdout)
    assert made["request"]["generator"] == "instruct-pix2pix" and made["request"]["options"]["image_guidance"] == 2.5
    bad = runner.invoke(app, [*args[:-4], "--option", "image_guidance=99", *args[-4:]])
    lines = bad.stderr.strip().splitlines()
    assert bad.exit_code == 2 and len(lines) == 1 and "'instruct-pix2pix'" in lines[0] and "image_guidance" in lines[0]


@pytest.fixture
def llm_says(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Make the LLM's reply a given text (parsed, routed and generated as usual): what a trained model would write."""
    import anyverse.session as session_module

    def say(text: str) -> None:
        class Reply:
            def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
                self.ids: list[int] = []

            def __iter__(self) -> Iterator[str]:
                yield text

        monkeypatch.setattr(session_module, "GenerationStream", Reply)

    return say


def test_plugin_options_from_a_meta_response_reach_the_plugin(session: Anyverse, photo: Path, llm_says) -> None:  # type: ignore[no-untyped-def]
    options = {"seed": 3, "image_guidance": 2.5}
    llm_says('Here it is at night. <|request|>{"modality": "image", "prompt": "night", "source": "img_1", '
             f'"generator": "instruct-pix2pix", "options": {json.dumps(options)}}}<|/request|>')
    result = session.turn("make img_1 look like night", [photo])
    assert [m.request.generator for m in result.media] == ["instruct-pix2pix"], result.notices
    source = session.media["img_1"]
    direct = session.generate("night", generator="instruct-pix2pix", source=source, options=options)
    other = session.generate("night", generator="instruct-pix2pix", source=source, options={"seed": 3})
    assert result.media[0].media.sha256 == direct.media.sha256 != other.media.sha256


def test_a_bad_option_in_a_meta_response_is_a_notice_naming_plugin_and_field(session: Anyverse, llm_says) -> None:  # type: ignore[no-untyped-def]
    llm_says('<|request|>{"modality": "audio", "prompt": "hello", "generator": "vits", '
             '"options": {"speaking_rate": 99, "seed": 1}}<|/request|> and <|request|>{"modality": "image", '
             '"prompt": "a cat", "options": {"strenght": 0.5}}<|/request|>')
    result = session.turn("say hello")
    assert result.media == []
    assert any("'vits'" in n and "speaking_rate" in n for n in result.notices), result.notices
    assert any("'image'" in n and "strenght" in n for n in result.notices), result.notices


def test_run_generator_steers_a_full_turn(tmp_path: Path) -> None:
    args = ["run", "read this aloud", "--generator", "vits", "--json", "--out", str(tmp_path), *sets(VITS)]
    for seed in range(4):  # the tiny LLM's random request may not fit its token budget; another seed does
        result = runner.invoke(app, [*args, "--seed", str(seed)])
        assert result.exit_code == 0, result.output
        media = json.loads(result.stdout)["media"]
        if media:
            break
    assert media and media[0]["request"]["generator"] == "vits" and media[0]["media"]["format"] == "wav"


def test_batch_job_options_reach_the_plugin_and_a_bad_one_fails_only_its_job(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"id": "good", "prompt": "draw", "outputs": ["image"], "options": {"image": {"strength": 0.9}}},
             {"id": "bad", "prompt": "draw", "outputs": ["image"], "options": {"image": {"strenght": 0.9}}}]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = runner.invoke(app, ["batch", "run", str(jobs), "--out", str(tmp_path / "out"), "--mode", "signal"])
    assert result.exit_code == 0, result.output
    got = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    image = next(m for m in got["good"]["media"] if m["modality"] == "image")
    assert got["good"]["status"] == "ok" and image["request"]["options"]["strength"] == 0.9
    assert got["bad"]["status"] == "failed" and "'image'" in got["bad"]["error"] and "strenght" in got["bad"]["error"]


# ---------------------------------------------------------------- the protocol: batches, progress, cancel


@pytest.mark.parametrize("name", ["image", "video"])  # callback_on_step_end, and the older callback argument
def test_progress_reports_each_step_and_cancel_stops(session: Anyverse, name: str) -> None:
    from anyverse.types import MediaRequest

    generator = session.generators.get(name)
    requests = [MediaRequest(modality=Modality(name), prompt=p, options=RequestOptions(seed=0, steps=3))
                for p in ("a", "b")]
    steps: list[tuple[int, int]] = []
    made = generator.generate(requests, [None, None], progress=lambda step, total: steps.append((step, total)))
    assert len(made) == 2 and steps == [(1, 3), (2, 3), (3, 3)] * 2
    cancel = threading.Event()

    def stop_after_one(step: int, total: int) -> None:
        cancel.set()

    with pytest.raises(GenerationCancelled, match="step 2"):
        generator.generate(requests, [None, None], progress=stop_after_one, cancel=cancel)


def test_a_turn_streams_generator_progress_before_the_media(session: Anyverse, llm_says) -> None:  # type: ignore[no-untyped-def]
    llm_says('<|request|>{"modality": "image", "prompt": "a cat", "options": {"steps": 3}}<|/request|>')
    events = list(session.stream("draw a cat", seed=0))
    kinds = [e.kind for e in events]
    progress = [(e.index, e.generator, e.step, e.total) for e in events if isinstance(e, MediaProgress)]
    ran = next(e for e in events if e.kind == "media").request.generator
    assert ran and progress == [(0, ran, step, 3) for step in (1, 2, 3)]
    assert kinds.index("progress") > kinds.index("request") and kinds.index("media") > kinds.index("progress")


# ---------------------------------------------------------------- isolation


BROKEN = '''
from typing import ClassVar
from pydantic import Field
from anyverse.plugins import BaseGenerator, Options
from anyverse.types import Modality

class BadOptions(Options):
    level: float = Field(default=5.0, le=1.0)

class InvalidOptions(BaseGenerator):
    name: ClassVar[str] = "invalid-options"
    modality: ClassVar[Modality] = Modality.IMAGE
    Options = int

class BadDefault(InvalidOptions):
    name: ClassVar[str] = "bad-default"
    Options = BadOptions

class LoadFails(BaseGenerator):
    name: ClassVar[str] = "load-fails"
    modality: ClassVar[Modality] = Modality.IMAGE
    loaded = False

    def load(self):
        raise RuntimeError("weights are corrupt")

    def unload(self):
        pass
'''


@pytest.fixture
def broken_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An installed distribution (plain dist-info on sys.path) with three broken plugins."""
    site = tmp_path / "site"
    info = site / "anyverse_broken-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "anyverse_broken.py").write_text(BROKEN)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: anyverse-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [anyverse.generators]
        import-error = anyverse_broken_missing:Generator
        invalid-options = anyverse_broken:InvalidOptions
        bad-default = anyverse_broken:BadDefault
        load-fails = anyverse_broken:LoadFails
    """))
    monkeypatch.syspath_prepend(str(site))
    plugins._discover.cache_clear()
    yield site
    plugins._discover.cache_clear()


def test_broken_plugins_are_listed_with_why_and_the_others_keep_working(broken_site: Path, tmp_path: Path) -> None:
    done, _ = anyverse_cli("generators", "list", "--check", "--json", env={"PYTHONPATH": str(broken_site)})
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert "No module named 'anyverse_broken_missing'" in rows["import-error"]["broken"]
    assert "Options must subclass" in rows["invalid-options"]["broken"]
    assert "invalid Options model" in rows["bad-default"]["broken"] and "level" in rows["bad-default"]["broken"]
    assert rows["load-fails"]["broken"] is None and rows["vits"]["broken"] is None
    quick, _ = anyverse_cli("generators", "list", "--json", env={"PYTHONPATH": str(broken_site)})
    assert "cannot find module" in {r["name"]: r for r in json.loads(quick.stdout)}["import-error"]["broken"]

    overrides = ["generators.load-fails.tiny={}", "generators.invalid-options.tiny={}", *VITS]
    av = Anyverse.from_profile("tiny", overrides, output_dir=tmp_path / "out")
    broken = {row["name"]: row["broken"] for row in av.generators.describe()}
    assert "Options must subclass" in broken["invalid-options"] and broken["load-fails"] is None
    with pytest.raises(ValueError, match="'load-fails' is broken: load failed: RuntimeError: weights are corrupt"):
        av.generate("x", generator="load-fails")
    with pytest.raises(ValueError, match="'load-fails' is broken"):  # reported once, not retried
        av.generate("x", generator="load-fails")
    assert av.generate("x", modality="image", options={"seed": 0}).request.generator == "image"
    assert av.generate("hi", generator="vits").media.format == "wav"


def test_anyverse_plugins_restricts_third_party_plugins() -> None:
    everything, _ = anyverse_cli("generators", "list", "--json")
    built_ins = {row["name"] for row in json.loads(everything.stdout) if row["built_in"]}
    done, _ = anyverse_cli("generators", "list", "--json", env={"ANYVERSE_PLUGINS": "vits"})
    names = {row["name"] for row in json.loads(done.stdout)}
    assert names == built_ins | {"vits"} and {"stable-diffusion", "audioldm2"} <= built_ins


def test_a_configured_plugin_that_is_not_installed_is_skipped(tmp_path: Path) -> None:
    av = Anyverse.from_profile("tiny", ["generators.gone.tiny={}"], output_dir=tmp_path)
    assert "unknown generator plugin 'gone'" in av.generators.describe()[-1]["broken"]
    assert av.generate("x", modality="image", options={"seed": 0}).media.path.is_file()


# ---------------------------------------------------------------- writing one


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["audio"])
def test_generators_new_writes_a_package_whose_own_test_passes(tmp_path: Path, modality: str) -> None:
    result = runner.invoke(app, ["generators", "new", "my-tone", "--modality", modality, "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    package = Path(result.stdout.strip())
    assert {p.name for p in package.iterdir()} >= {"pyproject.toml", "README.md", "anyverse_my_tone.py", "tests"}
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(package)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    listed = subprocess.run([sys.executable, "-c", "from anyverse.cli.app import main; main()", "generators", "list"],
                            capture_output=True, text=True, env=env, check=True)
    assert "my-tone" in listed.stdout and "anyverse-my-tone 0.1.0" in listed.stdout
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
                           capture_output=True, text=True, env=env, cwd=package, timeout=300)
    assert tests.returncode == 0 and "3 passed" in tests.stdout, tests.stdout + tests.stderr
    again = runner.invoke(app, ["generators", "new", "my-tone", "--dir", str(tmp_path)])
    assert again.exit_code == 2 and "already exists" in again.stderr
