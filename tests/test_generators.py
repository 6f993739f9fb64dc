"""Generator plugins on the tiny profile: the three built-ins through the public protocol, discovery, and the pool."""

from __future__ import annotations

import logging
from importlib.metadata import EntryPoint
from typing import Any

import numpy as np
import pytest
import torch
from mock_generators import MockImage

from anyverse import plugins
from anyverse.config import GeneratorConfig, TinySpec, load_config
from anyverse.plugins import (
    GeneratedMedia,
    Generator,
    available_generators,
    get_generator_class,
)
from anyverse.pool import GeneratorPool
from anyverse.types import GenerationOptions, MediaRequest, Modality
from anyverse.weights import MissingWeightsError

CPU = torch.device("cpu")
BUILT_INS = {"stable-diffusion": Modality.IMAGE, "zeroscope": Modality.VIDEO, "audioldm2": Modality.AUDIO}
OUTPUTS = list(BUILT_INS.values())


@pytest.fixture(scope="module")
def configs() -> dict[Modality, GeneratorConfig]:
    return load_config("tiny").generators


@pytest.fixture(scope="module")
def generators(configs: dict[Modality, GeneratorConfig]) -> dict[Modality, Generator]:
    return {m: get_generator_class(c.plugin)(c, CPU, torch.float32) for m, c in configs.items()}


def make(generator: Generator, request: MediaRequest, source: GeneratedMedia | None = None) -> GeneratedMedia:
    """One item through the batched protocol."""
    return generator.generate([request], [source])[0]


def request(modality: Modality, seed: int | None = 0, **options: Any) -> MediaRequest:
    return MediaRequest(modality=modality, prompt="a red cat", options=GenerationOptions(seed=seed, **options))


def expected_shape(modality: Modality, options: dict, media: GeneratedMedia) -> tuple[int, ...]:
    if modality is Modality.IMAGE:
        return (options["height"], options["width"], 3)
    if modality is Modality.VIDEO:
        assert media.fps is not None
        frames = options["frames"] or round(options["seconds"] * media.fps)
        return (frames, options["height"], options["width"], 3)
    assert media.sample_rate is not None
    return (round(options["seconds"] * media.sample_rate),)


# ---------------------------------------------------------------- built-ins


@pytest.mark.parametrize("modality", OUTPUTS)
def test_generates_from_prompt_with_configured_shape(generators, configs, modality):
    media = make(generators[modality], request(modality))
    assert media.modality is modality
    assert media.data.dtype == np.float32
    assert media.data.shape == expected_shape(modality, configs[modality].options, media)
    low = -1.0 if modality is Modality.AUDIO else 0.0
    assert low <= media.data.min() and media.data.max() <= 1.0
    assert np.isfinite(media.data).all()
    assert media.data.std() > 0
    assert (media.fps == 8) == (modality is Modality.VIDEO)
    assert (media.sample_rate == 16000) == (modality is Modality.AUDIO)


@pytest.mark.parametrize(
    ("modality", "options"),
    [
        (Modality.IMAGE, {"width": 16, "height": 24, "steps": 1}),
        (Modality.VIDEO, {"frames": 2, "width": 16, "height": 16}),
        (Modality.VIDEO, {"seconds": 0.25, "frames": None}),  # seconds in the request beat frames in the config
        (Modality.AUDIO, {"seconds": 0.128}),
    ],
)
def test_request_options_override_config_defaults(generators, configs, modality, options):
    media = make(generators[modality], request(modality, **options))
    assert media.data.shape == expected_shape(modality, {**configs[modality].options, **options}, media)


@pytest.mark.parametrize("modality", [Modality.IMAGE, Modality.VIDEO])
def test_a_size_the_pipeline_cannot_make_is_rounded_down_to_a_multiple_of_8(generators, modality):
    media = make(generators[modality], request(modality, width=30, height=20, steps=1, frames=2))
    assert media.data.shape[-3:-1] == (16, 24)  # (height, width)


def test_options_above_the_configs_max_options_are_lowered_to_them(generators, configs):
    media = make(generators[Modality.IMAGE], request(Modality.IMAGE, width=4096, height=40, steps=1))
    caps = configs[Modality.IMAGE].max_options
    assert media.data.shape[-3:-1] == (40, caps["width"])
    video = generators[Modality.VIDEO].options(request(Modality.VIDEO, frames=500, seconds=60.0))
    assert (video.frames, video.seconds) == (configs[Modality.VIDEO].max_options["frames"], 1.0)


@pytest.mark.parametrize("modality", OUTPUTS)
def test_seed_makes_output_reproducible(generators, modality):
    generator = generators[modality]
    first, again, other = (make(generator, request(modality, seed)).data for seed in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("modality", OUTPUTS)
def test_conditioning_spec_is_read_without_loading_and_matches_encode_prompts(configs, modality):
    config = configs[modality]
    generator = get_generator_class(config.plugin)(config, CPU, torch.float32)
    spec = generator.conditioning_spec()
    assert not generator.loaded
    assert spec and all(length > 0 and width > 0 for length, width in spec.values())
    encoded = generator.encode_prompts(["a red cat", "a much longer prompt than the first one"])
    assert {name: tuple(encoded[name].shape) for name in spec} == {name: (2, *shape) for name, shape in spec.items()}
    generator.unload()


def test_tiny_conditioning_specs_follow_the_saved_configs(generators):
    specs = {m: g.conditioning_spec() for m, g in generators.items()}
    assert specs == {
        Modality.IMAGE: {"prompt_embeds": (16, 32)},
        Modality.VIDEO: {"prompt_embeds": (16, 32)},
        Modality.AUDIO: {"prompt_embeds": (16, 32), "generated_prompt_embeds": (8, 24)},
    }


@pytest.mark.parametrize("modality", OUTPUTS)
@pytest.mark.parametrize("guidance", [None, 1.0])
def test_generates_from_conditioning_of_the_declared_shapes(generators, configs, modality, guidance):
    generator = generators[modality]
    conditioning = {name: torch.randn(1, *shape) for name, shape in generator.conditioning_spec().items()}
    options = GenerationOptions(seed=0, guidance=guidance)
    req = MediaRequest(modality=modality, conditioning=conditioning, origin="signal", options=options)
    media = make(generator, req)
    assert media.data.shape == expected_shape(modality, configs[modality].options, media)
    assert np.isfinite(media.data).all()


@pytest.mark.parametrize("modality", OUTPUTS)
def test_wrong_conditioning_shape_names_the_expected_one(generators, modality):
    generator = generators[modality]
    spec = generator.conditioning_spec()
    name, (length, width) = next(iter(spec.items()))
    conditioning = {n: torch.randn(1, *s) for n, s in spec.items()} | {name: torch.randn(1, length + 1, width)}
    with pytest.raises(ValueError, match=rf"{name}.*\(1, {length}, {width}\)"):
        make(generator, MediaRequest(modality=modality, conditioning=conditioning))


def test_audio_conditioning_needs_both_sequences(generators):
    generator = generators[Modality.AUDIO]
    length, width = generator.conditioning_spec()["prompt_embeds"]
    req = MediaRequest(modality=Modality.AUDIO, conditioning={"prompt_embeds": torch.randn(1, length, width)})
    with pytest.raises(ValueError, match="generated_prompt_embeds"):
        make(generator, req)


def test_request_needs_prompt_or_conditioning(generators):
    with pytest.raises(ValueError, match="neither a prompt nor conditioning"):
        make(generators[Modality.IMAGE], MediaRequest(modality=Modality.IMAGE))


def test_stable_diffusion_varies_a_source_image(generators):
    generator = generators[Modality.IMAGE]
    assert Modality.IMAGE in generator.accepts_source
    rng = np.random.default_rng(0)
    sources = [GeneratedMedia(Modality.IMAGE, rng.random((48, 40, 3), dtype=np.float32)) for _ in range(2)]
    req = MediaRequest(modality=Modality.IMAGE, prompt="a red cat", options=generator.Options(seed=0, strength=0.9))
    first, second = (make(generator, req, s).data for s in sources)
    assert first.shape == (32, 32, 3) and first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert not np.array_equal(first, second)


def test_generators_refuse_sources_they_cannot_edit(generators):
    source = GeneratedMedia(Modality.IMAGE, np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="zeroscope cannot edit image"):
        make(generators[Modality.VIDEO], request(Modality.VIDEO), source=source)


@pytest.mark.parametrize(("options", "field"), [({"strenght": 0.5}, "strenght"), ({"strength": 2.0}, "strength")])
def test_bad_config_options_fail_at_construction(options, field):
    config = GeneratorConfig(plugin="stable-diffusion", tiny=TinySpec(), options=options)
    with pytest.raises(ValueError, match=rf"stable-diffusion.*{field}"):
        get_generator_class("stable-diffusion")(config, CPU, torch.float32)


def test_missing_real_weights_say_what_and_how():
    config = GeneratorConfig(plugin="zeroscope", path="nobody/missing-model")
    generator = get_generator_class("zeroscope")(config, CPU, torch.float32)
    with pytest.raises(MissingWeightsError, match="nobody/missing-model") as err:
        generator.check_weights()
    assert "hf download nobody/missing-model" in str(err.value)
    assert "generators.video.path" in str(err.value)
    assert not generator.loaded


def test_pool_reports_every_missing_generator():
    configs = {
        Modality.IMAGE: GeneratorConfig(plugin="stable-diffusion", path="nobody/missing-sd"),
        Modality.VIDEO: GeneratorConfig(plugin="zeroscope", path="/nowhere/zeroscope"),
    }
    with pytest.raises(MissingWeightsError) as err:
        GeneratorPool(configs, CPU, torch.float32, memory_budget_gb=1.0).check_weights()
    assert len(err.value.missing) == 2
    assert "nobody/missing-sd" in str(err.value) and "cerspense/zeroscope_v2_576w" in str(err.value)


# ---------------------------------------------------------------- discovery


def test_built_ins_are_found_through_entry_points():
    points = {p.name: p.value for p in plugins.entry_points(group=plugins.ENTRY_POINT_GROUP)}
    found = available_generators()
    for name, modality in BUILT_INS.items():
        assert name in points
        assert found[name].name == name and found[name].modality is modality
        assert found[name].__module__.startswith("anyverse.generators.")


def test_unknown_plugin_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown generator plugin 'nope'.*stable-diffusion"):
        get_generator_class("nope")


def test_broken_entry_point_is_skipped_with_a_warning(monkeypatch, caplog):
    group = plugins.ENTRY_POINT_GROUP
    points = [
        EntryPoint("broken", "anyverse_no_such_module:Generator", group),
        EntryPoint("misnamed", "anyverse.generators.zeroscope:ZeroscopeGenerator", group),
        EntryPoint("stable-diffusion", "anyverse.generators.stable_diffusion:StableDiffusionGenerator", group),
    ]
    monkeypatch.setattr(plugins, "entry_points", lambda group: points)
    plugins._discover.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="anyverse.plugins"):
            found = available_generators()
    finally:
        plugins._discover.cache_clear()
    assert "stable-diffusion" in found and "broken" not in found and "misnamed" not in found
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "'broken'" in warned and "No module named" in warned and "'misnamed'" in warned


# ---------------------------------------------------------------- plugins defined in tests, and the pool


def mock_pool(budget_gb: float) -> GeneratorPool:
    configs = {
        m: GeneratorConfig(plugin=f"mock-{m.value}", tiny=TinySpec(), options={"level": 0.25}) for m in OUTPUTS
    }
    return GeneratorPool(configs, CPU, torch.float32, memory_budget_gb=budget_gb)


def test_registered_plugin_is_usable_through_the_pool():
    assert isinstance(MockImage(GeneratorConfig(plugin="mock-image", tiny=TinySpec()), CPU, torch.float32), Generator)
    pool = mock_pool(budget_gb=10.0)
    media = make(pool.get(Modality.IMAGE), MediaRequest(modality=Modality.IMAGE, prompt="x"))
    assert media.data.shape == (2, 2, 3) and float(media.data[0, 0, 0]) == 0.25
    assert pool.conditioning_specs()[Modality.AUDIO] == {"prompt_embeds": (3, 4)}
    pool.check_weights()


def test_pool_loads_on_first_get_and_unloads_least_recently_used(caplog):
    pool = mock_pool(budget_gb=1.0)  # room for two mocks
    assert pool.loaded() == []
    before = MockImage.loads
    pool.get(Modality.IMAGE)
    pool.get(Modality.IMAGE)
    assert MockImage.loads == before + 1
    pool.get(Modality.VIDEO)
    pool.get(Modality.IMAGE)  # video is now the least recently used
    with caplog.at_level(logging.INFO, logger="anyverse.pool"):
        pool.get(Modality.AUDIO)
    assert pool.loaded() == ["image", "audio"]
    assert any("unloading video" in r.getMessage() for r in caplog.records)


def test_pool_keeps_the_requested_generator_even_over_budget():
    pool = mock_pool(budget_gb=0.1)
    pool.get(Modality.IMAGE)
    assert pool.loaded() == ["image"]
    pool.get(Modality.AUDIO)
    assert pool.loaded() == ["audio"]


def test_pool_of_tiny_built_ins_swaps_within_budget(configs):
    pool = GeneratorPool(
        {m: configs[m] for m in (Modality.IMAGE, Modality.VIDEO)}, CPU, torch.float32, memory_budget_gb=1e-6
    )
    assert pool.conditioning_specs()[Modality.VIDEO] == {"prompt_embeds": (16, 32)}
    image = pool.get(Modality.IMAGE)
    assert pool.loaded() == ["image"] and image.memory_bytes() > 0
    pool.get(Modality.VIDEO)
    assert pool.loaded() == ["video"] and not image.loaded
    with pytest.raises(ValueError, match="no generator configured for audio"):
        pool.get(Modality.AUDIO)


def test_pool_refuses_a_plugin_for_the_wrong_modality():
    config = GeneratorConfig(plugin="mock-image", tiny=TinySpec())
    with pytest.raises(ValueError, match=r"generators\.audio: plugin 'mock-image' makes image"):
        GeneratorPool({Modality.AUDIO: config}, CPU, torch.float32, memory_budget_gb=1.0)
