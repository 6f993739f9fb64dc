"""The toy world: a tiny synthetic dataset of shapes, sounds and moving shapes with exact captions and dialogs.

Small enough to train every stage on a CPU in minutes, rich enough to test what matters: captions follow from the
attributes, and some attribute combinations (green triangles, long high chirps) never appear in training, so the
``compositional`` split measures whether a model combines what it learned rather than memorising pairs.
Every random choice comes from generators seeded by (seed, stream), so a given (n, seed) always gives the same bytes.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Final, Literal

import numpy as np
from PIL import Image, ImageDraw

from anyverse.media import save_audio, save_image, save_video
from anyverse.train.manifest import (
    CaptionRecord,
    DialogRecord,
    MediaRef,
    PairRecord,
    RequestRecord,
    TurnRecord,
    write_manifest,
)
from anyverse.types import Media, Modality

log = logging.getLogger(__name__)

IMAGE: Final = Modality.IMAGE
AUDIO: Final = Modality.AUDIO
VIDEO: Final = Modality.VIDEO
MIN_N = 24  # below this a split (train, test or compositional) of some modality can come out empty
SIDE, FPS, FRAMES, SAMPLE_RATE = 64, 8, 16, 16000
TEST_FRACTION = 0.2
# Extra items per item for encoder pretraining alone, standing for the web-scale data the real ImageBind saw. A tiny
# ViT learns shape only from many images: supervised on shape labels, the toy world's vision tower reached 0.61 on
# held-out images from its 150 training images and 0.94 from 3000 fresh ones (1000 steps each). Extra sounds keep
# the audio tower's share of each batch (videos are the costly inputs, and the vision tower is theirs too).
PRETRAIN_PER_ITEM: dict[Modality, int] = {Modality.IMAGE: 10, Modality.AUDIO: 3}
COLOURS = {"red": (220, 50, 47), "green": (60, 190, 70), "blue": (50, 100, 235), "yellow": (235, 205, 40)}
PITCH_HZ = {"low": 300.0, "medium": 800.0, "high": 2000.0}
LENGTH_S = {"short": 0.5, "long": 1.5}
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (18, 18, 24)
VOCABULARY: dict[Modality, dict[str, tuple[str, ...]]] = {
    IMAGE: {"shape": ("circle", "square", "triangle"), "colour": tuple(COLOURS),
            "position": ("top left", "top right", "bottom left", "bottom right")},
    AUDIO: {"kind": ("tone", "chirp"), "pitch": tuple(PITCH_HZ), "length": tuple(LENGTH_S)},
    VIDEO: {"shape": ("circle", "square", "triangle"), "colour": tuple(COLOURS), "direction": tuple(STEP)},
}
HELD_OUT: dict[Modality, dict[str, str]] = {
    IMAGE: {"colour": "green", "shape": "triangle"},
    AUDIO: {"length": "long", "pitch": "high", "kind": "chirp"},
    VIDEO: {"colour": "green", "shape": "triangle"},
}
# Image -> sound for the describe_and_sound intent: a fixed, learnable mapping between the worlds.
_PITCH_OF = {"red": "low", "green": "medium", "blue": "high", "yellow": "medium"}
_KIND_OF = {"circle": "tone", "square": "tone", "triangle": "chirp"}
# Each holds encoder alignment's caption instructions too: one that instruction tuning never saw ("write a caption
# for img_1") came back, after it, as a caption plus a sound request, the nearest intent it had learnt.
_DESCRIBE = {IMAGE: ["what is in {id}?", "describe {id}", "what does {id} show?", "tell me what is in {id}",
                     "write a caption for {id}"],
             AUDIO: ["describe {id}", "what do you hear in {id}?", "what sound is {id}?", "tell me about {id}",
                     "what is in {id}?", "write a caption for {id}"],
             VIDEO: ["what happens in {id}?", "describe {id}", "what does {id} show?", "tell me what {id} shows",
                     "what is in {id}?", "write a caption for {id}"]}
# User phrasings per intent: (shared by both splits, test only).
TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "make_image": (["draw {p}", "make an image of {p}", "show me a picture of {p}", "paint {p}"],
                   ["can you draw {p}?"]),
    "make_video": (["make a video of {p}", "animate {p}", "show me a video of {p}"], ["film {p}"]),
    "make_audio": (["play {p}", "make the sound of {p}", "let me hear {p}"], ["generate {p}"]),
    "describe_and_sound": (["describe {id} and turn it into a sound", "what is in {id}? make it a sound too",
                            "describe {id} and play it as audio"], ["tell me about {id} and make a sound of it"]),
    "edit_image": (["make {id} {p}", "change {id} to {p}", "recolour {id} {p}"], ["paint {id} {p}"]),
    "sound_of": (["play {id} as a sound", "turn {id} into a sound", "play it as a sound", "play {id}",
                  "make the sound of {id}"], ["let me hear {id}"]),
}
# "play {id}" and "make the sound of {id}" mirror make_audio's "play {p}" and "make the sound of {p}": a sound verb
# before an id asks for that media as a sound, before a caption for the caption (README).
INTENTS = ("describe", "make_image", "make_video", "make_audio", "describe_and_sound", "edit_image", "conversation")
_MAKES: Final[dict[str, Literal[Modality.IMAGE, Modality.VIDEO, Modality.AUDIO]]] = {
    "make_image": IMAGE, "make_video": VIDEO, "make_audio": AUDIO}
_OUTPUTS = ("media", "pairs-train.jsonl", "pairs-test.jsonl", "pairs-pretrain.jsonl", "dialogs-train.jsonl",
            "dialogs-test.jsonl", "captions-train.jsonl", "text.txt", "README.md")
_PARTIAL = ".toyworld-partial"  # marks a directory an interrupted run was writing, so a rerun may overwrite it


@dataclass(frozen=True)
class Item:
    """One generated media file: its path relative to the dataset directory and its attributes (with split)."""

    modality: Modality
    path: str
    attributes: dict[str, str]

    @property
    def caption(self) -> str:
        return caption(self.modality, self.attributes)

    @property
    def pair(self) -> PairRecord:
        return PairRecord(media=self.path, modality=self.modality, caption=self.caption, attributes=self.attributes)


@dataclass(frozen=True)
class ToyWorldSummary:
    """Where the dataset went and how many pairs/dialogs each split holds (the ``counts`` of toyworld.json)."""

    directory: Path
    counts: dict[str, dict[str, dict[str, int]]]


def caption(modality: Modality, a: dict[str, str]) -> str:
    """The exact caption of a toy-world item: every attribute, always in the same words."""
    if modality == IMAGE:
        return f"a {a['colour']} {a['shape']} at the {a['position']}"
    if modality == AUDIO:
        return f"a {a['length']} {a['pitch']} {a['kind']}"
    return f"a {a['colour']} {a['shape']} moving {a['direction']}"


def language() -> list[tuple[Modality, str]]:
    """Every caption the toy world's grammar can say, held-out combinations included: those are held out as media,
    not as phrases, as a real LLM has read of things no image it was aligned on shows."""
    return [(m, caption(m, dict(zip(v, combo, strict=True)))) for m, v in VOCABULARY.items()
            for combo in itertools.product(*v.values())]


def language_captions(pairs: list[PairRecord]) -> list[CaptionRecord]:
    """What lm-pretrain reads back from a media block: the training pairs' captions, and every phrase of the language
    about as often as a training combination's pairs, so no phrase is one the LM learnt never to say."""
    phrases = language()
    records = [CaptionRecord(modality=p.modality, caption=p.caption) for p in pairs]
    for modality in VOCABULARY:
        mine = [text for m, text in phrases if m == modality]
        repeats = max(1, round(sum(p.modality == modality for p in pairs) / len(mine)))
        records += [CaptionRecord(modality=modality, caption=text) for text in mine for _ in range(repeats)]
    return records


def is_held_out(modality: Modality, attributes: dict[str, str]) -> bool:
    """True for the combinations that never appear in training."""
    return all(attributes.get(k) == v for k, v in HELD_OUT[modality].items())


def image_to_sound(a: dict[str, str]) -> dict[str, str]:
    """Audio attributes an image 'sounds like': colour sets the pitch, shape the kind, height the length."""
    length = "short" if a["position"].startswith("top") else "long"
    return {"kind": _KIND_OF[a["shape"]], "pitch": _PITCH_OF[a["colour"]], "length": length}


def _cycle(pool: list[tuple[str, ...]], k: int, rng: np.random.Generator) -> list[tuple[str, ...]]:
    """k combos drawn as whole shuffled passes over the pool: uniform, yet every combo before any repeats."""
    out: list[tuple[str, ...]] = []
    while len(out) < k:
        out.extend(pool[i] for i in rng.permutation(len(pool)))
    return out[:k]


def _sample(modality: Modality, n: int, rng: np.random.Generator, pretrain: bool = False) -> list[dict[str, str]]:
    """n attribute sets with a split; test combos always also occur in train, held-out ones only in compositional.
    With ``pretrain``, n sets of split ``pretrain``, from training combinations only (for encoder pretraining)."""
    keys = list(VOCABULARY[modality])
    combos = list(itertools.product(*VOCABULARY[modality].values()))
    held = [c for c in combos if is_held_out(modality, dict(zip(keys, c, strict=True)))]
    seen = [c for c in combos if c not in held]
    if pretrain:
        return [{**dict(zip(keys, c, strict=True)), "split": "pretrain"} for c in _cycle(seen, n, rng)]
    n_held = max(1, round(n * len(held) / len(combos)))
    n_test = max(1, round(TEST_FRACTION * (n - n_held)))
    train = _cycle(seen, n - n_held - n_test, rng)
    splits = [("train", train), ("test", _cycle(list(dict.fromkeys(train)), n_test, rng)),
              ("compositional", _cycle(held, n_held, rng))]
    items = [{**dict(zip(keys, c, strict=True)), "split": s} for s, group in splits for c in group]
    return [items[i] for i in rng.permutation(n)]


def _colour(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 21, 3), 0, 255).tolist()
    return r, g, b


def _draw(shape: str, colour: tuple[int, int, int], x: float, y: float, r: float) -> Image.Image:
    im = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    draw = ImageDraw.Draw(im)
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    elif shape == "square":
        draw.rectangle((x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r), fill=colour)
    else:
        draw.polygon([(x, y - r), (x - r, y + 0.8 * r), (x + r, y + 0.8 * r)], fill=colour)
    return im


def _image(a: dict[str, str], rng: np.random.Generator) -> Image.Image:
    """One shape in its quadrant, its size and offset jittered but never crossing into another quadrant."""
    r = float(rng.uniform(8, 12))
    room = SIDE / 4 - r - 1
    x = (SIDE * 3 / 4 if a["position"].endswith("right") else SIDE / 4) + rng.uniform(-room, room)
    y = (SIDE * 3 / 4 if a["position"].startswith("bottom") else SIDE / 4) + rng.uniform(-room, room)
    return _draw(a["shape"], _colour(a["colour"], rng), x, y, r)


def _audio(a: dict[str, str], rng: np.random.Generator) -> np.ndarray:
    """A sine (tone) or a linear sweep from 0.7x to 1.4x the base pitch (chirp), faded in and out over 10 ms."""
    seconds = LENGTH_S[a["length"]] * rng.uniform(0.9, 1.1)
    f0 = PITCH_HZ[a["pitch"]] * rng.uniform(0.94, 1.06)
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    lo, hi = (f0, f0) if a["kind"] == "tone" else (0.7 * f0, 1.4 * f0)
    wave = np.sin(2 * np.pi * (lo * t + (hi - lo) * t**2 / (2 * seconds)))
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.01)
    return (rng.uniform(0.4, 0.6) * fade * wave).astype(np.float32)


def _video(a: dict[str, str], rng: np.random.Generator) -> np.ndarray:
    """The shape travelling half the frame width in its direction over the clip, on a steady cross-axis line."""
    r, travel = float(rng.uniform(7, 10)), SIDE / 2
    dx, dy = STEP[a["direction"]]
    start = [float(rng.uniform(r + 2, SIDE - r - 2)) for _ in range(2)]  # the moving axis is overwritten below
    for axis, d in enumerate((dx, dy)):
        if d:
            near = float(rng.uniform(r + 2, SIDE - travel - r - 2))
            start[axis] = near if d > 0 else SIDE - near
    colour = _colour(a["colour"], rng)
    steps = [i / (FRAMES - 1) * travel for i in range(FRAMES)]
    return np.stack([np.asarray(_draw(a["shape"], colour, start[0] + dx * s, start[1] + dy * s, r)) for s in steps])


def render(modality: Modality, attributes: dict[str, str], rng: np.random.Generator) -> np.ndarray:
    """One toy-world item with these attributes: image uint8 [H,W,3], video uint8 [F,H,W,3], audio float32 [N]."""
    if modality == IMAGE:
        return np.asarray(_image(attributes, rng))
    return _audio(attributes, rng) if modality == AUDIO else _video(attributes, rng)


def read_caption(modality: Modality, text: str) -> dict[str, str]:
    """The attributes a text names, by whole words; where it names several values of one, the last one."""
    words = f" {' '.join(re.sub(r'[^a-z]+', ' ', text.lower()).split())} "
    found = {}
    for key, values in VOCABULARY[modality].items():
        spots = [(words.rfind(f" {v} "), v) for v in values if f" {v} " in words]
        if spots:
            found[key] = max(spots)[1]
    return found


def read_image(pixels: np.ndarray) -> dict[str, str]:
    """Attributes of a toy-world image, read back from its pixels [H,W,3] in [0,1]: the nearest colour, the
    quadrant of the shape's centre, and the shape from how much of its bounding box it fills."""
    rgb = pixels * 255.0
    mask = np.abs(rgb - np.array(BACKGROUND)).sum(-1) > 60
    if not mask.any():
        return {}
    ys, xs = np.nonzero(mask)
    mean = rgb[mask].mean(0)
    colour = min(COLOURS, key=lambda c: float(np.abs(np.array(COLOURS[c]) - mean).sum()))
    fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    shape = "triangle" if fill < 0.65 else "circle" if fill < 0.9 else "square"
    height, width = mask.shape
    vertical = "top" if ys.mean() < height / 2 else "bottom"
    return {"shape": shape, "colour": colour, "position": f"{vertical} {'left' if xs.mean() < width / 2 else 'right'}"}


def _write_media(directory: Path, modality: Modality, n: int, seed: int, pretrain: bool = False) -> list[Item]:
    """Render n items and place them as media/<modality>/<index>.<ext> (the writers name by hash; we rename); with
    ``pretrain``, n encoder-pretraining items in media/pretrain-<modality>/ from a stream of their own."""
    # random streams: 0-2 the modalities' media, 3 the dialogs, 4-6 the pretraining media, 7 the conversations
    stream = list(VOCABULARY).index(modality) + (len(VOCABULARY) + 1 if pretrain else 0)
    rng = np.random.default_rng([seed, stream])
    folder = f"pretrain-{modality.value}" if pretrain else modality.value
    out_dir = directory / "media" / folder
    items = []
    for index, attributes in enumerate(_sample(modality, n, rng, pretrain)):
        media: Media
        data = render(modality, attributes, rng)
        if modality == IMAGE:
            media = save_image(data, out_dir)
        elif modality == AUDIO:
            media = save_audio(data, SAMPLE_RATE, out_dir)
        else:
            media = save_video(data, FPS, out_dir)
        name = f"{index:06d}{media.path.suffix}"
        os.replace(media.path, out_dir / name)
        items.append(Item(modality, f"media/{folder}/{name}", attributes))
    return items


def _dialog(intent: str, item: Item, user: str, reply: str, request: RequestRecord | None, attach: bool
            ) -> DialogRecord:
    ref = [MediaRef(id=f"{item.modality.label}_1", media=item.path, modality=item.modality)] if attach else []
    split = item.attributes["split"]
    return DialogRecord(messages=[TurnRecord(role="user", text=user, media=ref),
                                  TurnRecord(role="assistant", text=reply, requests=[request] if request else [])],
                        attributes={"intent": intent, "split": split})


def _ask(intent: str, item: Item, rng: np.random.Generator, **fields: str) -> str:
    """A user phrasing of the intent; test dialogs may also use phrasings training never saw."""
    shared, test_only = TEMPLATES[intent]
    phrasings = shared if item.attributes["split"] == "train" else shared + test_only
    return str(rng.choice(phrasings)).format(**fields)


def _dialogs(items: dict[Modality, list[Item]], rng: np.random.Generator) -> list[DialogRecord]:
    """About n dialogs per intent (describe: n per modality), each built on one item and sharing its split; train never
    names a held-out combo."""
    out = []
    for j, image in enumerate(items[IMAGE]):
        test = image.attributes["split"] != "train"
        for medium in (items[modality][j] for modality in VOCABULARY):
            describe = str(rng.choice(_DESCRIBE[medium.modality])).format(id=f"{medium.modality.label}_1")
            out.append(_dialog("describe", medium, describe, medium.caption, None, True))
        for intent, kind in _MAKES.items():
            item, prompt = items[kind][j], items[kind][j].caption
            reply = f"here is a video of {prompt}" if kind == VIDEO else f"here is {prompt}"
            out.append(_dialog(intent, item, _ask(intent, item, rng, p=prompt), reply,
                               RequestRecord(modality=kind, prompt=prompt), False))
        sound = image_to_sound(image.attributes)
        if test or not is_held_out(AUDIO, sound):
            out.append(_dialog("describe_and_sound", image, _ask("describe_and_sound", image, rng, id="img_1"),
                               image.caption, RequestRecord(modality=AUDIO, prompt=caption(AUDIO, sound)), True))
        colours = [c for c in COLOURS if c != image.attributes["colour"]
                   and (test or not is_held_out(IMAGE, {**image.attributes, "colour": c}))]
        colour = str(rng.choice(colours))
        edited = caption(IMAGE, {**image.attributes, "colour": colour})
        out.append(_dialog("edit_image", image, _ask("edit_image", image, rng, id="img_1", p=colour),
                           f"here is {edited}", RequestRecord(modality=IMAGE, prompt=edited, source="img_1"), True))
    return out


class _Conversation:
    """A multi-turn dialog being written: its turns, and the media the assistant made (rendered and saved)."""

    def __init__(self, directory: Path, image: Item, index: int, rng: np.random.Generator):
        self.directory, self.image, self.index, self.rng = directory, image, index, rng
        self.turns: list[TurnRecord] = []
        self.ids = {"img": 0, "aud": 0}  # media of each kind so far, attached or made: the next id

    @property
    def test(self) -> bool:
        return self.image.attributes["split"] != "train"

    def ask(self, intent: str, rng: np.random.Generator | None = None, **fields: str) -> None:
        self.turns.append(TurnRecord(role="user", text=_ask(intent, self.image, rng or self.rng, **fields)))

    def attach(self, text: str) -> str:
        self.ids["img"] += 1
        media_id = f"img_{self.ids['img']}"
        self.turns.append(TurnRecord(role="user", text=text.format(id=media_id), media=[
            MediaRef(id=media_id, media=self.image.path, modality=IMAGE)]))
        return media_id

    def say(self, text: str) -> None:
        self.turns.append(TurnRecord(role="assistant", text=text))

    def make(self, text: str, modality: Modality, attributes: dict[str, str], source: str | None = None,
             rng: np.random.Generator | None = None) -> str:
        """An assistant turn that requests an item; the toy world renders what it makes. Returns the item's id."""
        label = modality.label
        self.ids[label] += 1
        media_id = f"{label}_{self.ids[label]}"
        out_dir = self.directory / "media" / f"made-{modality.value}"
        data = render(modality, attributes, rng or self.rng)
        media = save_image(data, out_dir) if modality == IMAGE else save_audio(data, SAMPLE_RATE, out_dir)
        name = f"{self.index:06d}-{len(self.turns):02d}{media.path.suffix}"
        os.replace(media.path, out_dir / name)
        request = RequestRecord(modality=modality, prompt=caption(modality, attributes), source=source)
        self.turns.append(TurnRecord(role="assistant", text=text, requests=[request], media=[
            MediaRef(id=media_id, media=f"media/made-{modality.value}/{name}", modality=modality)]))
        return media_id


def _conversation(directory: Path, image: Item, index: int, rng: np.random.Generator,
                  fresh: np.random.Generator) -> DialogRecord:
    """2-4 exchanges on one image: attach it and ask, or have it drawn; recolour it; then maybe ask what the new
    image shows (the model captions media it made) and turn it into a sound, in either order. A training
    conversation may also ask for a new sound by name among the later turns, so the sound verbs are seen after a
    caption and an edit, not only as a first turn; it draws from ``fresh``, and the test conversations stay as
    they were."""
    talk = _Conversation(directory, image, index, rng)
    attributes = image.attributes
    plain = {k: v for k, v in attributes.items() if k != "split"}
    if rng.random() < 0.5:
        shown = talk.attach(str(rng.choice(_DESCRIBE[IMAGE])))
        talk.say(image.caption)
    else:
        talk.ask("make_image", p=image.caption)
        shown = talk.make(f"here is {image.caption}", IMAGE, plain)
    colours = [c for c in COLOURS if c != attributes["colour"]
               and (talk.test or not is_held_out(IMAGE, {**attributes, "colour": c}))]
    edited = {**plain, "colour": str(rng.choice(colours))}
    talk.ask("edit_image", id=shown, p=edited["colour"])
    made = talk.make(f"here is {caption(IMAGE, edited)}", IMAGE, edited, source=shown)
    sound = image_to_sound(edited)
    later = ["describe"] + (["sound"] if talk.test or not is_held_out(AUDIO, sound) else [])
    steps = [later[i] for i in rng.permutation(len(later))][: int(rng.integers(0, 3))]
    if not talk.test and len(steps) < 2 and fresh.random() < 0.5:
        steps.insert(int(fresh.integers(0, len(steps) + 1)), "new sound")
    for step in steps:
        if step == "new sound":
            named = {k: v for k, v in _sample(AUDIO, 1, fresh, pretrain=True)[0].items() if k != "split"}  # seen
            talk.ask("make_audio", fresh, p=caption(AUDIO, named))
            talk.make(f"here is {caption(AUDIO, named)}", AUDIO, named, rng=fresh)
        elif step == "describe":
            talk.turns.append(TurnRecord(role="user", text=str(rng.choice(_DESCRIBE[IMAGE])).format(id=made)))
            talk.say(caption(IMAGE, edited))
        else:
            talk.ask("sound_of", id=made)
            talk.make(f"here is {caption(AUDIO, sound)}", AUDIO, sound)
    return DialogRecord(messages=talk.turns, attributes={"intent": "conversation", "split": attributes["split"]})


def _check_directory(directory: Path) -> None:
    """Refuse to write into anything but a new/empty directory or an earlier (possibly interrupted) toy world."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: exists and is not a directory")
    earlier = (directory / "toyworld.json").is_file() or (directory / _PARTIAL).is_file()
    if directory.is_dir() and any(directory.iterdir()) and not earlier:
        raise ValueError(f"{directory}: directory is not empty and holds no toy world (no toyworld.json); "
                         "choose a new or empty directory")


def make_toyworld(directory: Path, n: int = 200, seed: int = 0) -> ToyWorldSummary:
    """Write n images, n sounds, n videos, their manifests, dialogs and text corpus into ``directory``, and the
    encoder-pretraining set (``pairs-pretrain.jsonl``: the training pairs plus more images and sounds of training
    combinations).

    An earlier toy world there is replaced. toyworld.json is written last and removed first, so it never points at
    missing files.
    """
    if n < MIN_N:
        raise ValueError(f"--n {n} is too small: need at least {MIN_N} so every split gets items")
    directory = Path(directory)
    _check_directory(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / _PARTIAL).touch()
    (directory / "toyworld.json").unlink(missing_ok=True)
    for name in _OUTPUTS:
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    items = {m: _write_media(directory, m, n, seed) for m in VOCABULARY}
    extra = [item for m, k in PRETRAIN_PER_ITEM.items() for item in _write_media(directory, m, k * n, seed, True)]
    log.info("wrote %d media files to %s", 3 * n + len(extra), directory / "media")
    dialogs = _dialogs(items, np.random.default_rng([seed, len(VOCABULARY)]))
    talk_rng = np.random.default_rng([seed, 2 * len(VOCABULARY) + 1])  # after the pretraining media's streams
    fresh_rng = np.random.default_rng([seed, 2 * len(VOCABULARY) + 2])
    dialogs += [_conversation(directory, image, j, talk_rng, fresh_rng) for j, image in enumerate(items[IMAGE])]
    counts: dict[str, dict[str, dict[str, int]]] = {"pairs": {}, "dialogs": {}}
    text: list[str] = []
    for side in ("train", "test"):
        pairs = [i.pair for m in VOCABULARY for i in items[m]
                 if (i.attributes["split"] == "train") == (side == "train")]
        chosen = [d for d in dialogs if (d.attributes["split"] == "train") == (side == "train")]
        write_manifest(directory / f"pairs-{side}.jsonl", pairs)
        write_manifest(directory / f"dialogs-{side}.jsonl", chosen)
        for p in pairs:
            counts["pairs"].setdefault(p.attributes["split"], {}).setdefault(p.modality.value, 0)
            counts["pairs"][p.attributes["split"]][p.modality.value] += 1
        counts["dialogs"][side] = {intent: sum(d.attributes["intent"] == intent for d in chosen) for intent in INTENTS}
        if side == "train":
            text = [p.caption for p in pairs] + [t.text for d in chosen for t in d.messages]
            text += [phrase for _, phrase in language()]
            write_manifest(directory / "captions-train.jsonl", language_captions(pairs))
            write_manifest(directory / "pairs-pretrain.jsonl", pairs + [i.pair for i in extra])
            counts["pairs"]["pretrain"] = {m.value: k * n for m, k in PRETRAIN_PER_ITEM.items()}
    (directory / "text.txt").write_text("".join(line + "\n" for line in text), encoding="utf-8")
    card = resources.files("anyverse.datasets") / "toyworld.md"
    (directory / "README.md").write_text(card.read_text(encoding="utf-8"), encoding="utf-8")

    meta = {"seed": seed, "n": n,
            "vocabulary": {m.value: {k: list(v) for k, v in vocab.items()} for m, vocab in VOCABULARY.items()},
            "held_out": [{"modality": m.value, "attributes": a} for m, a in HELD_OUT.items()],
            "counts": counts}
    tmp = directory / ".toyworld.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tmp.replace(directory / "toyworld.json")
    (directory / _PARTIAL).unlink()
    return ToyWorldSummary(directory, counts)
