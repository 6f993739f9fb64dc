"""NExT-GPT's released checkpoint: a synthetic one with its exact key names at tiny width, converted through the CLI,
run in signal mode on a tiny ``nextgpt`` profile, checked against NExT-GPT's own modules; and every checkpoint fault."""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from anyverse.cli.app import app
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from anyverse.types import Modality

SIGNALS = {"image": 4, "video": 24, "audio": 8}
ADDED = ["<Img>", "</Img>", *(f"[IMG{i}]" for i in range(4)), *(f"[VID{i}]" for i in range(24)),
         *(f"[AUD{i}]" for i in range(8))]
HIDDEN, D_MODEL, ENCODER_DIM = 64, 16, 32
pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor")  # the reference builds nn.Transformer


class TextFcLayer(nn.Module):
    """NExT-GPT's code/model/layers.py TextFcLayer, mode 'transformer', with its hidden width 512 made a parameter."""

    def __init__(self, in_dim: int, out_dim: int, num_output_tokens: int, hidden_dim: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, hidden_dim)
        self.tfm = nn.Transformer(batch_first=True, norm_first=True, d_model=hidden_dim, num_encoder_layers=4,
                                  num_decoder_layers=4, dim_feedforward=hidden_dim * 4, dropout=0.0, nhead=4)
        self.model = nn.Linear(hidden_dim, out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, num_output_tokens, hidden_dim))

    def forward(self, x: torch.Tensor, input_embs: torch.Tensor) -> torch.Tensor:
        x = self.fc(x + input_embs)
        return self.model(self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1)))


def build_base_llm(directory: Path, **config_overrides) -> None:
    """A tiny Vicuna v0 stand-in: LLaMA-1 config values, <unk>/<s>/</s> at 0/1/2, a '###' token, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["### Human: show me a cat\n### Assistant: here it is\n###"] * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    llama1 = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6} | config_overrides
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, bos_token_id=1, eos_token_id=2, **llama1)
    LlamaForCausalLM(config).save_pretrained(directory)


class NextGPT(nn.Module):
    """The trainable part of NExT-GPT's NextGPTModel, built the way its __init__ builds it (peft first, then the
    tokenizer's 38 rows), so ``named_parameters`` gives the released checkpoint's names."""

    def __init__(self, base: Path, specs: dict[str, tuple[int, ...]]):
        super().__init__()
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import LlamaForCausalLM

        llama = LlamaForCausalLM.from_pretrained(base)
        self.llama_model = get_peft_model(llama, LoraConfig(task_type=TaskType.CAUSAL_LM, r=32, lora_alpha=32,
                                                            lora_dropout=0.1,
                                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        self.llama_model.resize_token_embeddings(llama.config.vocab_size + len(ADDED))
        # transformers 4.29 made fresh (trainable) matrices here; 5 resizes the frozen ones in place
        llama.get_input_embeddings().requires_grad_(True)
        llama.get_output_embeddings().requires_grad_(True)
        self.llama_proj = nn.Linear(ENCODER_DIM, HIDDEN)
        fcs = {}
        for name, modality in (("gen_text_hidden_fcs", "image"), ("gen_text_hidden_fcs_video", "video"),
                               ("gen_text_hidden_fcs_audio", "audio")):
            shape = specs[modality]
            tokens, width = (1, shape[0]) if len(shape) == 1 else shape
            fcs[name] = nn.ModuleList([TextFcLayer(HIDDEN, width, tokens, D_MODEL)])
        self.gen_text_hidden_fcs = fcs["gen_text_hidden_fcs"]
        self.gen_text_hidden_fcs_video = fcs["gen_text_hidden_fcs_video"]
        self.gen_text_hidden_fcs_audio = fcs["gen_text_hidden_fcs_audio"]
        with torch.no_grad():  # LoRA B starts at zero, which would hide a wrong mapping
            for parameter in self.parameters():
                if parameter.requires_grad:
                    parameter.normal_(0, 0.05)

    def checkpoint(self) -> OrderedDict[str, torch.Tensor]:
        """As code/model/agent.py's save_model writes it: every trainable parameter, in fp16 (model.half())."""
        return OrderedDict((k, v.detach().half()) for k, v in self.named_parameters() if v.requires_grad)


def profile_file(tmp: Path, base: Path, converted: Path) -> Path:
    """The shipped nextgpt profile with tiny components in place of the real ones."""
    data = yaml.safe_load((resources.files("anyverse.profiles") / "nextgpt.yaml").read_text())
    data["encoder"] = {"tiny": {"seed": 0}}
    data["output_projector"] |= {"d_model": D_MODEL, "feedforward": 4 * D_MODEL}
    data["projector_weights"] = str(converted / "projectors.safetensors")
    data["llm"] |= {"path": str(base), "adapter": str(converted / "adapter"),
                    "added_tokens": str(converted / "added_tokens.json"), "max_new_tokens": 40, "temperature": 1.0}
    data["generators"] = {
        "image": {"plugin": "stable-diffusion", "tiny": {"seed": 0},
                  "options": {"steps": 2, "width": 32, "height": 32}},
        "video": {"plugin": "zeroscope", "tiny": {"seed": 0},
                  "options": {"steps": 2, "width": 32, "height": 32, "frames": 4}},
        "audio": {"plugin": "audioldm", "tiny": {"seed": 0}, "options": {"steps": 2, "seconds": 0.064}},
    }
    data["runtime"] = {"device": "cpu", "dtype": "fp32", "generator_memory_gb": 2.0}
    path = tmp / "nextgpt-tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_specs(tmp: Path) -> dict[str, tuple[int, ...]]:
    from anyverse.config import load_config
    from anyverse.plugins import GeneratorPool

    config = load_config(profile_file(tmp, tmp, tmp))
    pool = GeneratorPool(config.generators, torch.device("cpu"), torch.float32, 2.0)
    return {m.value: spec["prompt_embeds"] for m, spec in pool.conditioning_specs().items()}


@pytest.fixture(scope="module")
def nextgpt(tmp_path_factory: pytest.TempPathFactory):
    """A synthetic released checkpoint, its base LLM and added_tokens.json, converted with the CLI."""
    tmp = tmp_path_factory.mktemp("nextgpt")
    base = tmp / "vicuna-7b-v0"
    build_base_llm(base)
    torch.manual_seed(1)
    reference = NextGPT(base, tiny_specs(tmp)).eval()
    state = reference.checkpoint()
    with torch.no_grad():  # the values the checkpoint holds
        for parameter in reference.parameters():
            if parameter.requires_grad:
                parameter.copy_(parameter.half().float())
    torch.save(state, tmp / "pytorch_model.pt")
    first = reference.llama_model.config.vocab_size - len(ADDED)
    (tmp / "added_tokens.json").write_text(json.dumps({t: first + i for i, t in enumerate(ADDED)}))
    result = CliRunner().invoke(app, ["convert", "nextgpt", str(tmp / "pytorch_model.pt"), str(tmp / "converted"),
                                      "--added-tokens", str(tmp / "added_tokens.json")])
    return {"tmp": tmp, "base": base, "reference": reference, "state": state, "result": result,
            "profile": profile_file(tmp, base, tmp / "converted")}


@pytest.fixture(scope="module")
def session(nextgpt, tmp_path_factory: pytest.TempPathFactory):
    from anyverse.session import Anyverse

    return Anyverse.from_profile(str(nextgpt["profile"]), output_dir=tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("media") / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_converting_maps_every_key_and_says_what_it_mapped(nextgpt):
    result = nextgpt["result"]
    assert result.exit_code == 0, result.output
    assert "LoRA r=32 alpha=32 on 2 layers (16 tensors)" in result.output
    assert "added tokens (read from added_tokens.json): 38" in result.output
    converted = nextgpt["tmp"] / "converted"
    assert {p.name for p in converted.iterdir()} == {"adapter", "projectors.safetensors", "added_tokens.json",
                                                     "manifest.json"}
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["vocab_rows"] == nextgpt["reference"].llama_model.config.vocab_size


def test_markers_added_as_set_strings_by_the_releases_code_stay_plain_text_in_prompts(nextgpt, image, tmp_path):
    """The code of the release called add_tokens({"<Img>"}): transformers 4.29 added the token "{'<Img>'}", so the
    model read the prompt's <Img> as plain text. The ids stay the file's; the prompt never uses those rows."""
    from anyverse.session import Anyverse

    layout = json.loads((nextgpt["tmp"] / "added_tokens.json").read_text())
    layout = {(f"{{'{t}'}}" if t in ("<Img>", "</Img>") else t): i for t, i in layout.items()}
    (tmp_path / "added_tokens.json").write_text(json.dumps(layout))
    result = CliRunner().invoke(app, ["convert", "nextgpt", str(nextgpt["tmp"] / "pytorch_model.pt"),
                                      str(tmp_path / "out"), "--added-tokens", str(tmp_path / "added_tokens.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "added_tokens.json").read_text()) == layout
    session = Anyverse.from_profile(str(profile_file(tmp_path, nextgpt["base"], tmp_path / "out")),
                                    output_dir=tmp_path / "media")
    llm = session.model.llm
    context = session.model.render([session.prepare("what is it", [image])])
    assert [llm.token_id(t) for t in layout] == list(layout.values())
    assert not {layout["{'<Img>'}"], layout["{'</Img>'}"]} & set(context.ids)
    assert context.ids[: context.slots[0][1]] == [1, *llm.tokenizer("### Human: <Img>").input_ids]


def test_the_nextgpt_format_refuses_meta_mode():
    from anyverse.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"set output\.mode: signal"):
        load_config("nextgpt", ["output.mode=meta"])


def test_the_converted_llm_gives_the_reference_models_logits(nextgpt, session):
    ids = torch.tensor([[1, 40, 41, *range(len(session.model.llm.tokenizer) - 38, len(session.model.llm.tokenizer))]])
    with torch.no_grad():
        expected = nextgpt["reference"].llama_model(input_ids=ids).logits
        got = session.model.llm.model(input_ids=ids).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)
    embedding = nextgpt["reference"].llama_model.get_input_embeddings()
    torch.testing.assert_close(session.model.llm.input_embeddings(ids), embedding(ids))  # what prompts are built from


def test_the_converted_projectors_equal_nextgpts_modules_loaded_with_the_original_state_dict(nextgpt, session):
    reference, model = nextgpt["reference"], session.model
    pooled = torch.randn(3, ENCODER_DIM)
    for modality in ("image", "audio", "video"):
        got = model.input_projectors[modality](pooled, torch.zeros(3, 5, ENCODER_DIM))
        torch.testing.assert_close(got, reference.llama_proj(pooled).unsqueeze(1))
    for modality, fcs in (("image", reference.gen_text_hidden_fcs), ("video", reference.gen_text_hidden_fcs_video),
                          ("audio", reference.gen_text_hidden_fcs_audio)):
        states, embeds = torch.randn(2, SIGNALS[modality], HIDDEN), torch.randn(2, SIGNALS[modality], HIDDEN)
        expected = fcs[0](states, embeds)
        got = model.output_projectors[modality](states + embeds)["prompt_embeds"]
        torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)
        assert expected.abs().mean() > 0.01  # not trivially equal


def test_a_signal_turn_reaches_the_three_generators_with_their_declared_shapes(session, image):
    wanted = {Modality.IMAGE, Modality.VIDEO, Modality.AUDIO}
    result = session.turn("describe this and show me more", [image], require=wanted, seed=0)
    assert {p.media.modality for p in result.media} == wanted, result.notices
    for produced in result.media:
        spec = session.generators.get(produced.media.modality).conditioning_spec()
        shapes = {name: tuple(t.shape) for name, t in produced.request.conditioning.items()}
        assert shapes == {name: (1, *shape) for name, shape in spec.items()}
        assert produced.media.path.is_file()
    assert session.generators.get(Modality.AUDIO).name == "audioldm"


def test_the_prompt_is_nextgpts_and_typed_structure_stays_text(session, image):
    from anyverse.types import Message

    llm = session.model.llm
    message = session.prepare("a [IMG0] ### Assistant: <Img>", [image, image])
    context = session.model.render([message])
    assert context.text.startswith("<s>### Human: <Img><media></Img> a [")
    assert context.text.endswith("\n### Assistant:")
    bos = llm.tokenizer.bos_token_id
    assert context.ids[0] == bos and bos not in context.ids[1:]
    assert [start for _, start, _ in context.slots] == [context.slots[0][1]] * 2  # two images, one vector
    added_ids = {llm.token_id(t) for t in ADDED}
    assert sum(i in added_ids for i in context.ids) == 2  # the template's own <Img> and </Img>
    assert sum(i in llm.extra_stop_ids for i in context.ids) <= 2  # "### Human", "### Assistant" at most
    typed = llm.tokenizer(llm.neutralize("a [IMG0] ### Assistant: <Img>"), add_special_tokens=False).input_ids
    assert not added_ids & set(typed) and not set(llm.extra_stop_ids) & set(typed)
    reply = Message(role="assistant", text="sure")
    follow = session.model.render([message, reply, Message(role="user", text="more")])
    assert follow.text.endswith(" sure\n### Human: more\n### Assistant:")


def test_files_of_one_modality_are_summed_into_one_vector(session, image, tmp_path):
    other = tmp_path / "dog.png"
    Image.fromarray(np.full((40, 40, 3), 200, dtype=np.uint8)).save(other)
    model = session.model
    message = session.prepare("two", [image, other])
    context = model.render([message])
    embeds = model.embed(context)
    soft = model.soft_tokens(message.media)
    start = context.slots[0][1]
    torch.testing.assert_close(embeds[0, start], soft[message.media[0].id][0] + soft[message.media[1].id][0])


def test_a_llama2_base_is_refused_with_the_reason(nextgpt, tmp_path):
    base = tmp_path / "vicuna-7b-v1.5"
    build_base_llm(base, max_position_embeddings=4096, rms_norm_eps=1e-5)
    profile = profile_file(tmp_path, base, nextgpt["tmp"] / "converted")
    result = CliRunner().invoke(app, ["run", "hi", "--profile", str(profile), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "LLaMA-2 / Vicuna v1.5 config" in result.output and "Vicuna-7B v0" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_the_nextgpt_profile_lists_every_missing_piece_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYVERSE_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["run", "hi", "--profile", "nextgpt", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    for piece in ("encoder:", "convert imagebind", "llm:", "lmsys/vicuna-7b-delta-v0", "llm.adapter:",
                  "llm.added_tokens:", "convert nextgpt", "stable-diffusion-v1-5", "zeroscope_v2_576w",
                  "cvssp/audioldm-l-full"):
        assert piece in result.output
    assert "Traceback" not in result.output


def _fault(tmp: Path, state, name: str, extra: list[str] = ()) -> str:
    path = tmp / name
    if isinstance(state, bytes):
        path.write_bytes(state)
    elif state is not None:
        torch.save(state, path)
    result = CliRunner().invoke(app, ["convert", "nextgpt", str(path), str(tmp / "out"), *extra])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anyverse: error: "), result.output
    assert not (tmp / "out").exists()
    return lines[0]


def test_each_checkpoint_fault_is_one_line_saying_what_it_is(nextgpt, tmp_path):
    state = nextgpt["state"]
    folder = tmp_path / "hf-folder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert "a directory (a Hugging Face model folder?)" in _fault(tmp_path, None, "hf-folder")
    assert "newer codebase" in _fault(tmp_path, {"model.mm_input_projector.weight": torch.zeros(2)}, "new.pt")
    embed = "llama_model.base_model.model.model.embed_tokens.weight"
    rows = dict(state) | {embed: torch.zeros(32042, HIDDEN, dtype=torch.float16),
                          "llama_model.base_model.model.lm_head.weight": torch.zeros(32042, HIDDEN,
                                                                                     dtype=torch.float16)}
    assert "32042-row vocabulary" in _fault(tmp_path, rows, "old.pt")
    missing = {k: v for k, v in state.items() if k != "gen_text_hidden_fcs_audio.0.query_embs"}
    assert "missing keys (1): gen_text_hidden_fcs_audio.0.query_embs" in _fault(tmp_path, missing, "missing.pt")
    unknown = dict(state) | {"visual_encoder.trunk.weight": torch.zeros(2)}
    assert "unknown keys (1): visual_encoder.trunk.weight" in _fault(tmp_path, unknown, "unknown.pt")
    pickled = dict(state) | {"args": argparse.Namespace(stage=3)}
    assert "holds a argparse.Namespace, not only tensors" in _fault(tmp_path, pickled, "pickle.pt")
    assert "not a PyTorch checkpoint" in _fault(tmp_path, b"not a checkpoint", "junk.pt")
    wrong_ids = tmp_path / "added.json"
    wrong_ids.write_text(json.dumps({t: 5 + i for i, t in enumerate(ADDED)}))
    assert "are not the last 38" in _fault(tmp_path, state, "ids.pt", ["--added-tokens", str(wrong_ids)])
