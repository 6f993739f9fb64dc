"""AudioLDM-2 as the audio generator: a text prompt, or its two conditioning sequences, in; a waveform out.

Bypassing text needs both sequences the UNet cross-attends to: the Flan-T5 states (``prompt_embeds``) and the GPT-2
states generated from CLAP + T5 (``generated_prompt_embeds``). A single CLAP vector (NExT-GPT's AudioLDM-1 route) is
not enough here.

The denoising loss feeds the VAE what AudioLDM's VAE and HiFi-GAN vocoder were trained on: a natural-log mel
magnitude spectrogram [B, 1, frames, mel bins] at the vocoder's sample rate, one frame per vocoder hop.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from anyverse.config import GeneratorConfig, TinySpec
from anyverse.plugins import (
    DiffusersGenerator,
    DiffusersRuntime,
    DiffusionOptions,
    GeneratedMedia,
    check_source,
    tiny_arch,
)
from anyverse.types import GenerationOptions, Media, MediaRequest, Modality

T5_LENGTH = (("tokenizer_2/tokenizer_config.json", "model_max_length"), ("text_encoder_2/config.json", "n_positions"))


class AudioLDM2Options(DiffusionOptions):
    pass


class AudioLDM2Generator(DiffusersGenerator[AudioLDM2Options]):
    name: ClassVar[str] = "audioldm2"
    modality: ClassVar[Modality] = Modality.AUDIO
    Options: ClassVar[type[GenerationOptions]] = AudioLDM2Options

    def __init__(self, config: GeneratorConfig, device: torch.device, dtype: torch.dtype):
        self._runtime = DiffusersRuntime(
            type(self), config, device, dtype, options=AudioLDM2Options, pipeline_class="AudioLDM2Pipeline",
            build_tiny=build_tiny, usual_weights="cvssp/audioldm2",
        )

    def conditioning_spec(self) -> dict[str, tuple[int, ...]]:
        """T5 states padded to the T5 tokenizer's length, and the GPT-2 states (one per generated step)."""
        rt = self._runtime
        return {
            "prompt_embeds": (rt.config_int(*T5_LENGTH), rt.config_int(("text_encoder_2/config.json", "d_model"))),
            "generated_prompt_embeds": (
                rt.config_int(("language_model/config.json", "max_new_tokens")),
                rt.config_int(("language_model/config.json", "n_embd")),
            ),
        }

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's own encoding. Its T5 states are only as long as the longest prompt, so they are zero-padded
        to the spec's length; ``attention_mask`` [B, length] marks the real tokens (zeros elsewhere)."""
        pipe = self._runtime.pipeline()
        with torch.no_grad():
            embeds, mask, generated = pipe.encode_prompt(prompts, self._runtime.execution_device, 1, False)
        length = self.conditioning_spec()["prompt_embeds"][0]
        pad = length - embeds.shape[1]
        return {
            "prompt_embeds": torch.nn.functional.pad(embeds, (0, 0, 0, pad))[:, :length],
            "attention_mask": torch.nn.functional.pad(mask, (0, pad))[:, :length],
            "generated_prompt_embeds": generated,
        }

    def denoising_loss(self, conditioning: dict[str, torch.Tensor], media: list[Media]) -> torch.Tensor:
        """The configured length (else the pipeline's default) from each file's start, as a log-mel spectrogram the
        VAE encodes; the UNet gets the GPT-2 states and the T5 states with their mask, as the pipeline passes them
        (an all-ones mask where none is given, as the pipeline assumes for caller-given embeddings)."""
        from anyverse.media import decode_audio_clips

        from .stable_diffusion import DECODE_CAPS

        runtime = self._runtime
        pipe = runtime.pipeline()
        vocoder = pipe.vocoder.config
        hop, rate = math.prod(vocoder.upsample_rates), vocoder.sampling_rate
        factor, scale = hop / rate, pipe.vae_scale_factor  # seconds per mel frame; mel frames per latent row
        seconds = runtime.defaults.seconds or pipe.unet.config.sample_size * scale * factor
        frames = math.ceil(int(seconds / factor) / scale) * scale  # as AudioLDM2Pipeline.__call__ rounds
        clips = np.concatenate([decode_audio_clips(m, DECODE_CAPS, 1, frames * hop / rate, rate) for m in media])
        mel = log_mel(torch.from_numpy(clips), rate, hop, vocoder.model_in_dim)
        embeds = conditioning["prompt_embeds"]
        mask = conditioning.get("attention_mask")
        return runtime.denoising_loss(
            runtime.vae_latents(mel),
            encoder_hidden_states=conditioning["generated_prompt_embeds"],
            encoder_hidden_states_1=embeds,
            encoder_attention_mask_1=torch.ones(embeds.shape[:2], dtype=torch.long) if mask is None else mask,
        )

    def generate(self, request: MediaRequest, source: GeneratedMedia | None = None) -> GeneratedMedia:
        check_source(self, source)
        options = self._runtime.options(request)
        kwargs = self._runtime.call_kwargs(self, request, options, audio_length_in_s=options.seconds)
        pipe = self._runtime.pipeline()
        audio = np.asarray(pipe(**kwargs).audios[0], dtype=np.float32)
        # a vocoder may overshoot; writing PCM would clip there anyway
        return GeneratedMedia(Modality.AUDIO, np.clip(audio, -1.0, 1.0), sample_rate=pipe.vocoder.config.sampling_rate)


def log_mel(waveforms: torch.Tensor, sample_rate: int, hop: int, bins: int) -> torch.Tensor:
    """Waveforms [B, N] as AudioLDM's VAE input [B, 1, N // hop, bins], computed as its training data were: each
    waveform made zero-mean with peak 0.5; a Hann-window STFT with AudioLDM's window/hop ratio (1024/160 at 16 kHz),
    reflect-padded and uncentred so frame i covers hop i; magnitudes through Slaney mel filters (librosa's default)
    from 0 Hz to Nyquist; then HiFi-GAN's log compression, ln(max(x, 1e-5))."""
    from transformers.audio_utils import mel_filter_bank

    waveforms = waveforms.float()
    waveforms = waveforms - waveforms.mean(dim=1, keepdim=True)
    waveforms = 0.5 * waveforms / (waveforms.abs().amax(dim=1, keepdim=True) + 1e-8)
    n_fft = 2 ** round(math.log2(hop * 6.4))
    left = (n_fft - hop) // 2
    padded = F.pad(waveforms[:, None], (left, n_fft - hop - left), mode="reflect")[:, 0]
    magnitude = torch.stft(padded, n_fft, hop_length=hop, window=torch.hann_window(n_fft), center=False,
                           return_complex=True).abs()  # [B, n_fft // 2 + 1, N // hop]
    filters = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=bins, min_frequency=0.0,
                              max_frequency=sample_rate / 2, sampling_rate=sample_rate, norm="slaney",
                              mel_scale="slaney")
    mel = torch.from_numpy(filters.T).float() @ magnitude
    return torch.log(mel.clamp(min=1e-5)).transpose(1, 2)[:, None]


TINY_ARCH: dict[str, Any] = {
    "channels": [32, 64],  # UNet widths
    "vae_channels": [16, 32],  # the VAE downsamples by 2 ** (levels - 1); mel bins must divide by that
    "groups": 8,
    "clap_hidden": 32,
    "clap_projection": 16,
    "clap_max_length": 16,
    "t5_d_model": 32,
    "t5_max_length": 16,  # tokens; Flan-T5 in cvssp/audioldm2 has 512
    "gpt2_n_embd": 24,
    "gpt2_new_tokens": 8,
    "mel_bins": 8,
    "sampling_rate": 16000,
}


def build_tiny(directory: Path, spec: TinySpec) -> None:
    """A real AudioLDM2Pipeline with tiny random weights, saved as safetensors."""
    from diffusers import (
        AudioLDM2Pipeline,
        AudioLDM2ProjectionModel,
        AudioLDM2UNet2DConditionModel,
        DDIMScheduler,
    )
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapTextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        T5Config,
        T5EncoderModel,
    )

    from ._tiny_text import roberta_tokenizer, t5_tokenizer
    from .stable_diffusion import tiny_vae

    arch = tiny_arch(AudioLDM2Generator.name, TINY_ARCH, spec)
    gpt_dim, t5_dim, groups = arch["gpt2_n_embd"], arch["t5_d_model"], arch["groups"]
    unet_levels = len(arch["channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        tokenizer = roberta_tokenizer(arch["clap_max_length"])
        clap = ClapModel(ClapConfig(
            text_config=ClapTextConfig(
                vocab_size=len(tokenizer), hidden_size=arch["clap_hidden"], num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=2 * arch["clap_hidden"], max_position_embeddings=arch["clap_max_length"] + 2,
                projection_dim=arch["clap_projection"],
            ),
            audio_config=ClapAudioConfig(
                window_size=4, num_mel_bins=16, spec_size=64, patch_size=2, patch_stride=2, hidden_size=32,
                patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2],
                projection_dim=arch["clap_projection"],
            ),
            projection_dim=arch["clap_projection"],
        ))
        tokenizer_2 = t5_tokenizer(arch["t5_max_length"])
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=t5_dim, d_kv=8, d_ff=2 * t5_dim, num_layers=1, num_heads=4,
            pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
        ))
        gpt2_config = GPT2Config(
            vocab_size=8, n_embd=gpt_dim, n_layer=1, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        gpt2_config.max_new_tokens = arch["gpt2_new_tokens"]  # read by the pipeline (and by conditioning_spec)
        unet = AudioLDM2UNet2DConditionModel(
            in_channels=8,
            out_channels=8,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (unet_levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (unet_levels - 1) + ("UpBlock2D",),
            block_out_channels=tuple(arch["channels"]),
            layers_per_block=1,
            norm_num_groups=groups,
            cross_attention_dim=([None, gpt_dim, t5_dim],) * unet_levels,
            attention_head_dim=8,
        )
        vae = tiny_vae(arch["vae_channels"], groups, image_channels=1, latent_channels=8)
        vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
            model_in_dim=arch["mel_bins"], sampling_rate=arch["sampling_rate"], upsample_initial_channel=16,
            upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]], normalize_before=False,
        ))
        pipe: Any = AudioLDM2Pipeline(
            vae=vae,
            text_encoder=clap,
            text_encoder_2=t5,
            projection_model=AudioLDM2ProjectionModel(
                text_encoder_dim=arch["clap_projection"], text_encoder_1_dim=t5_dim, langauge_model_dim=gpt_dim
            ),
            language_model=GPT2LMHeadModel(gpt2_config),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            feature_extractor=ClapFeatureExtractor(),
            unet=unet,
            scheduler=DDIMScheduler(
                beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False,
                set_alpha_to_one=False, steps_offset=1,
            ),
            vocoder=vocoder,
        )
    pipe.save_pretrained(directory, safe_serialization=True)
