"""``DiffusersGenerator``: the base class of generators built on a diffusers pipeline, built-in or third-party.

    from anyverse.generators.base import DiffusersGenerator, DiffusionOptions

A subclass configures it with class attributes (``name``, ``modality``, ``capabilities``, ``Options``,
``pipeline_class``, ``usual_weights``), writes ``build_tiny`` (the pipeline with tiny random weights, saved with
``save_pretrained``) and ``generate_one`` (``self.call_kwargs(...)`` then ``self.pipeline()(**kwargs)``). The base
finds or builds the weights, loads them lazily, reports progress from the pipeline's step callback, stops on
``cancel``, seeds on the CPU, and offers what training through the frozen pipeline needs.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from anyverse.config import Caps, GeneratorConfig, TinySpec
from anyverse.plugins import (
    BaseGenerator,
    GenerationCancelled,
    Options,
    Progress,
    check_conditioning,
)
from anyverse.types import MediaRequest
from anyverse.weights import component_dir

log = logging.getLogger(__name__)

# Training media were checked against the run's caps when loaded; decoding them again only needs the defaults.
DECODE_CAPS = Caps()


class DiffusionOptions(Options):
    """Uniform options plus what every diffusers text-conditioned pipeline understands."""

    negative_prompt: str | None = None


class DiffusersGenerator(BaseGenerator):
    """A generator on one diffusers pipeline class; see the module docstring for what a subclass sets."""

    Options: ClassVar[type[DiffusionOptions]] = DiffusionOptions  # type: ignore[assignment]
    pipeline_class: ClassVar[str]  # a class exported by diffusers, e.g. "StableDiffusionPipeline"
    usual_weights: ClassVar[str]  # hub id suggested when real weights are missing

    def __init__(self, config: GeneratorConfig, device: torch.device, dtype: torch.dtype):
        super().__init__(config, device, dtype)
        self.pipe: Any = None
        self._noise_scheduler: Any = None
        self._directory: Path | None = None

    def options(self, request: MediaRequest) -> Any:
        """Sizes rounded down to multiples of 8, the only ones the pipelines take (a model may write any), so
        generation and a source's resizing see the same size."""
        options = super().options(request)
        sizes = {side: max(8, value // 8 * 8) for side in ("height", "width") if (value := getattr(options, side))}
        return options.model_copy(update=sizes)

    @classmethod
    def build_tiny(cls, directory: Path, spec: TinySpec) -> None:
        """Write the pipeline with tiny random weights into ``directory`` (``save_pretrained``, safetensors)."""
        raise NotImplementedError(f"{cls.name} has no tiny build; configure a path to real weights")

    # -- weights and saved configs

    def directory(self) -> Path:
        """The pipeline folder: tiny weights are built on first use, real ones must already be local."""
        if self._directory is None:
            self._directory = component_dir(self.name, self.config, self._build, self._how_to_get())
        return self._directory

    def _build(self, directory: Path) -> None:
        assert self.config.tiny is not None
        self.build_tiny(directory, self.config.tiny)

    def _how_to_get(self) -> str:
        path = self.config.path or ""
        hub_id = path.count("/") == 1 and not path.startswith(("/", ".", "~", "$"))
        return (
            f"Run `hf download {path if hub_id else self.usual_weights}` (on a machine with internet; copy its HF "
            f"cache here if that is another machine), or set generators.<name>.path of the {self.name} entry "
            f"(generators.{self.modality.value}.path in the one-per-modality form) to a local copy."
        )

    def check_weights(self) -> None:
        if self.config.tiny is None:
            self.directory()

    def config_int(self, *sources: tuple[str, str]) -> int:
        """The first usable (finite, positive) integer among ``(file, key)`` pairs of the saved pipeline configs."""
        for relative, key in sources:
            path = self.directory() / relative
            value = json.loads(path.read_text()).get(key) if path.is_file() else None
            if isinstance(value, int) and 0 < value < 1_000_000:
                return value
        tried = ", ".join(f"{relative}:{key}" for relative, key in sources)
        raise ValueError(f"{self.name}: no usable value in {self.directory()} for any of {tried}")

    # -- loading

    @property
    def loaded(self) -> bool:
        return self.pipe is not None

    def load(self) -> None:
        if self.pipe is not None:
            return
        start = time.perf_counter()
        diffusers = importlib.import_module("diffusers")
        if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):  # diffusers has no env knob of its own; honour HF's
            diffusers.utils.logging.disable_progress_bar()
        pipe = getattr(diffusers, self.pipeline_class).from_pretrained(self.directory(), dtype=self.dtype)
        if self.config.offload and self.device.type == "cuda":
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            if self.config.offload:
                log.info("%s: offload only applies to CUDA; loading onto %s", self.name, self.device)
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        log.info("loaded %s from %s in %.1f s", self.name, self.directory(), time.perf_counter() - start)

    def unload(self) -> None:
        if self.pipe is None:
            return
        self.pipe = self._noise_scheduler = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("unloaded %s", self.name)

    def pipeline(self) -> Any:
        self.load()
        return self.pipe

    @property
    def execution_device(self) -> torch.device:
        """Where inputs go: the device, or the accelerator the offload hooks run on."""
        return self.pipeline()._execution_device

    def memory_bytes(self) -> int:
        if self.pipe is None:  # variant copies (model.fp16.safetensors) are not what from_pretrained loads
            files = self.directory().rglob("*.safetensors")
            return sum(f.stat().st_size for f in files if len(f.name.split(".")) == 2)
        seen: dict[int, int] = {}
        for part in self.pipe.components.values():
            if isinstance(part, torch.nn.Module):
                for t in (*part.parameters(), *part.buffers()):
                    seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    # -- one call

    def call_kwargs(self, request: MediaRequest, options: DiffusionOptions, progress: Progress | None = None,
                    cancel: threading.Event | None = None, pipe: Any = None, **extra: Any) -> dict[str, Any]:
        """Keyword arguments for ``pipe`` (default: the loaded pipeline): the prompt, or the request's conditioning
        (which wins) with negatives from this generator's own encoders for classifier-free guidance; seed, steps,
        guidance, numpy output, a step callback for ``progress``/``cancel``, and ``extra``. Options left unset are
        not passed, so the pipeline's own defaults apply."""
        pipe = pipe if pipe is not None else self.pipeline()
        guidance = options.guidance
        if guidance is None:
            guidance = inspect.signature(pipe.__call__).parameters["guidance_scale"].default
        kwargs: dict[str, Any] = {
            "num_inference_steps": options.steps,
            "guidance_scale": guidance,
            "generator": _rng(options.seed, self.name),
            "output_type": "np",
            **_step_callback(pipe, progress, cancel, self.name),
            **extra,
        }
        if request.conditioning is not None:
            checked = check_conditioning(request.conditioning, self.conditioning_spec(), self.name)
            device = self.execution_device
            kwargs |= {name: tensor.to(device=device, dtype=self.dtype) for name, tensor in checked.items()}
            if guidance > 1:
                negatives = self.encode_prompts([options.negative_prompt or ""])
                kwargs |= {f"negative_{name}": tensor for name, tensor in negatives.items()}
        elif request.prompt:
            kwargs |= {"prompt": request.prompt, "negative_prompt": options.negative_prompt}
        else:
            raise ValueError(f"{self.name}: the request has neither a prompt nor conditioning tensors")
        return {name: value for name, value in kwargs.items() if value is not None}

    # -- training through the frozen pipeline

    def vae_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents of VAE input [N, C, H, W] (already in the VAE's range), as the pipeline's latents are
        before it decodes them. The posterior sample uses the global CPU RNG, which checkpoints save, so a resumed
        run draws the same; no graph is kept (the VAE is frozen)."""
        vae = self.pipeline().vae
        with torch.no_grad():
            posterior = vae.encode(pixels.to(self.execution_device, self.dtype)).latent_dist
            noise = torch.randn(posterior.mean.shape).to(posterior.mean)
            return (posterior.mean + posterior.std * noise) * vae.config.scaling_factor

    def diffusion_loss(self, latents: torch.Tensor, **conditioning: torch.Tensor) -> torch.Tensor:
        """Standard diffusion training loss: noise ``latents`` at timesteps drawn uniformly over the schedule's
        training range, let the frozen UNet predict from them with ``conditioning`` as its keyword arguments, and
        return the MSE to the target its ``prediction_type`` names. Gradients reach only ``conditioning``."""
        rows = {name: value.shape[0] for name, value in conditioning.items()}
        if set(rows.values()) != {latents.shape[0]}:
            raise ValueError(f"{self.name}: conditioning needs one row per media item ({latents.shape[0]}); got "
                             f"{rows}")
        pipe = self.pipeline()
        pipe.unet.requires_grad_(False)  # it is frozen: the backward pass must not fill (and keep) its .grad
        scheduler = self.noise_scheduler()
        device = latents.device
        steps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).to(device)
        noise = torch.randn(latents.shape).to(latents)
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = scheduler.get_velocity(latents, noise, steps)
        elif kind == "sample":
            target = latents
        else:
            raise ValueError(f"{self.name}: cannot train against prediction_type {kind!r}")
        inputs = {name: value.to(device, self.dtype if value.is_floating_point() else value.dtype)
                  for name, value in conditioning.items()}
        prediction = pipe.unet(scheduler.add_noise(latents, noise, steps), steps, **inputs, return_dict=False)[0]
        return F.mse_loss(prediction.float(), target.float())

    def noise_scheduler(self) -> Any:
        """A DDPM scheduler on the pipeline scheduler's config (betas, training steps, prediction type), as diffusers'
        training scripts use: it adds noise at any training timestep, which inference-only schedulers may not."""
        if self._noise_scheduler is None:
            from diffusers import DDPMScheduler

            self._noise_scheduler = DDPMScheduler.from_config(self.pipeline().scheduler.config)
        return self._noise_scheduler


def _step_callback(pipe: Any, progress: Progress | None, cancel: threading.Event | None,
                   plugin: str) -> dict[str, Any]:
    """The pipeline's per-step callback arguments: report ``progress(step, total)`` and stop when ``cancel`` is set
    (raising inside the callback ends the denoising loop at once). Newer pipelines take ``callback_on_step_end``,
    older ones (text-to-video, AudioLDM-2) ``callback`` with ``callback_steps``."""
    if progress is None and cancel is None:
        return {}

    def step(index: int) -> None:
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled(f"{plugin}: cancelled at step {index + 1}")
        if progress is not None:
            total = getattr(pipe, "_num_timesteps", None) or len(pipe.scheduler.timesteps)
            progress(index + 1, int(total))

    def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        step(index)
        return tensors

    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        return {"callback_on_step_end": on_step_end}
    return {"callback": lambda index, timestep, latents: step(index), "callback_steps": 1}


def _rng(seed: int | None, plugin: str) -> torch.Generator:
    """A CPU generator, so a seed gives the same noise on every device; no seed draws (and logs) a fresh one."""
    rng = torch.Generator(device="cpu")
    if seed is None:
        log.debug("%s: random seed %d", plugin, rng.seed())
    else:
        rng.manual_seed(seed)
    return rng
