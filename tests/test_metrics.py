"""Caption metrics match pycocoevalcap; ``anyverse eval captions`` reports them, CLIPScore and what it skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from anyverse.cli.app import app
from typer.testing import CliRunner

from anyverse.train.metrics import NOT_COMPUTED, bleu4, cider, clip_score, score_captions, tokenize

runner = CliRunner()

# Expected numbers computed by the reference: pycocoevalcap 1.2 (pip), raw captions through its PTBTokenizer
# (stanford-corenlp-3.4.1.jar, Java 17), then Bleu(4).compute_score(...)[0][3] and Cider().compute_score(...)[0].
REFERENCE_CASES = {
    "coco3": (
        ["A man riding a wave on top of a surfboard.", "A cat sitting on a laptop's keyboard!",
         "Two dogs playing in the park."],
        [["A surfer riding a wave in the ocean.", "A man on a surfboard, riding a large wave.",
          "A person surfing on a wave"],
         ["A cat laying on top of a laptop computer.", "A cat sits on the keyboard of a laptop",
          "An orange cat on a laptop."],
         ["Two dogs run after a frisbee in a grassy park.", "Dogs playing in the park!",
          "A couple of dogs chasing a Frisbee"]],
        0.3644217046237617, 2.4961125688239423,
    ),
    "brevity": (
        ["A dog", "A red bus on the street."],
        [["A brown dog runs across the grass.", "a dog playing outside"],
         ["A red double-decker bus on a city street."]],
        8.381118125055419e-09, 2.12627214645811,
    ),
    "empty_candidate": (
        ["", "A plate of food with broccoli."],
        [["A bowl of soup."], ["A plate of food with broccoli and rice.", "A white plate with food on it."]],
        0.4345982083314283, 2.3005563263112916,
    ),
    "one_image": (["A man riding a horse."], [["A man riding a brown horse.", "A person on a horse."]],
                  0.7598356852558453, 0.0),
}


@pytest.mark.parametrize("name", REFERENCE_CASES)
def test_scores_match_pycocoevalcap(name: str) -> None:
    candidates, references, expected_bleu, expected_cider = REFERENCE_CASES[name]
    assert bleu4(candidates, references) == pytest.approx(expected_bleu, rel=1e-12)
    assert cider(candidates, references) == pytest.approx(expected_cider, rel=1e-12, abs=1e-12)


# Expected token strings: pycocoevalcap's PTBTokenizer output (same jar as above) for these captions.
@pytest.mark.parametrize(("raw", "ptb"), [
    ("A man's hat, isn't it? \"Yes!\"", "a man 's hat is n't it yes"),
    ("I cannot do it... -- (really) o'clock 3.5-inch 1,000 dogs' bowls",
     "i can not do it -lrb- really -rrb- o'clock 3.5-inch 1,000 dogs bowls"),
    ("Don't walk sign at the corner of 5th St. and Main", "do n't walk sign at the corner of 5th st. and main"),
    ("An old-fashioned clock reads 10:30 a.m.", "an old-fashioned clock reads 10:30 a.m."),
    ("Pizza w/ pepperoni & olives, and/or 1/2 cheese", "pizza w / pepperoni & olives and/or 1/2 cheese"),
    ("They'll be fine, won't they?", "they 'll be fine wo n't they"),
])
def test_tokenize_follows_ptb(raw: str, ptb: str) -> None:
    assert " ".join(tokenize(raw)) == ptb


def test_hand_checkable_scores() -> None:
    refs = [["a black cat sleeps on the sofa"], ["two red buses drive down a road"]]
    same = ["A black cat sleeps on the sofa.", "Two red buses drive down a road!"]
    assert bleu4(same, refs) == pytest.approx(1.0, abs=1e-6)
    # every n-gram belongs to one image (idf log 2) and matches exactly: cosine 1 for each n, times 10
    assert cider(same, refs) == pytest.approx(10.0)
    disjoint = ["green apples hang from trees", "snow covers mountain peaks tonight"]
    assert bleu4(disjoint, refs) < 1e-6 and cider(disjoint, refs) == 0.0
    assert bleu4([""], [["a cat"]]) < 1e-6
    # the empty candidate scores 0; "a cat" matches on "cat" and "a cat" ("a" is in every image: idf 0) and has no
    # 3- or 4-grams, so 10 * (1 + 1 + 0 + 0) / 4 = 5 for it, 2.5 on average
    assert cider(["", "a cat"], [["a dog"], ["a cat"]]) == pytest.approx(2.5)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="2 candidates but 1"):
        bleu4(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no captions"):
        cider([], [])
    with pytest.raises(ValueError, match="at least one reference"):
        cider(["a"], [[]])


def test_missing_ids_are_listed_not_scored() -> None:
    scores = score_captions({"1": "a cat", "2": "a dog", "x": "a bird"}, {"1": ["a cat"], "2": ["a dog"]})
    assert (scores.n, scores.missing) == (2, ["x"])
    assert scores.bleu4 == bleu4(["a cat", "a dog"], [["a cat"], ["a dog"]])
    with pytest.raises(ValueError, match="none of the 1 predicted ids"):
        score_captions({"x": "a bird"}, {"1": ["a cat"]})


def _jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def caption_files(tmp_path: Path) -> tuple[Path, Path]:
    candidates, references, *_ = REFERENCE_CASES["coco3"]
    predictions = [{"id": i, "caption": c} for i, c in enumerate(candidates)] + [{"id": "extra", "caption": "hi"}]
    # both reference layouts: a list per line, and several single-caption lines for one id
    rows: list[dict[str, object]] = [{"id": 0, "captions": references[0]}, {"id": "1", "captions": references[1]}]
    rows += [{"id": 2, "caption": c} for c in references[2]]
    return _jsonl(tmp_path / "pred.jsonl", predictions), _jsonl(tmp_path / "refs.jsonl", rows)


def test_cli_json(caption_files: tuple[Path, Path]) -> None:
    pred, refs = caption_files
    result = runner.invoke(app, ["eval", "captions", "--predictions", str(pred), "--references", str(refs), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    _, _, expected_bleu, expected_cider = REFERENCE_CASES["coco3"]
    assert report["bleu4"] == pytest.approx(expected_bleu) and report["cider"] == pytest.approx(expected_cider)
    assert (report["n"], report["missing"], report["missing_ids"]) == (3, 1, ["extra"])

    text = runner.invoke(app, ["eval", "captions", "--predictions", str(pred), "--references", str(refs)]).stdout
    assert "bleu4: 0.3644" in text and "cider: 2.4961" in text and "missing: 1 " in text


@pytest.mark.parametrize("bad", ["{not json\n", '{"id": 1}\n', '["a"]\n', ""])
def test_cli_bad_file_is_one_line_exit_2(caption_files: tuple[Path, Path], tmp_path: Path, bad: str) -> None:
    pred, _ = caption_files
    (tmp_path / "bad.jsonl").write_text(bad)
    for args in (["--references", str(tmp_path / "bad.jsonl")], ["--references", str(tmp_path / "absent.jsonl")]):
        result = runner.invoke(app, ["eval", "captions", "--predictions", str(pred), *args])
        assert result.exit_code == 2
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("anyverse: error: ")


def _tiny_clip(directory: Path) -> Path:
    from anyverse.generators.tiny import clip_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer(77)
    text = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(directory)
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def test_cli_clipscore_and_uncomputed_fid_fad(caption_files: tuple[Path, Path], tmp_path: Path) -> None:
    from PIL import Image

    pred, refs = caption_files
    model = _tiny_clip(tmp_path / "clip")
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (48, 40), colour).save(tmp_path / f"{i}.png")
    media = _jsonl(tmp_path / "media.jsonl", [{"id": i, "path": f"{i}.png"} for i in range(2)])
    (tmp_path / "ref_images").mkdir()
    args = ["eval", "captions", "--predictions", str(pred), "--references", str(refs), "--clip-model", str(model),
            "--media", str(media), "--fid-reference", str(tmp_path / "ref_images"), "--fad-reference", str(tmp_path),
            "--device", "cpu"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 0.0 <= report["clipscore"] <= 2.5 and report["clipscore_n"] == 2
    assert report["not_computed"] == NOT_COMPUTED

    candidates = REFERENCE_CASES["coco3"][0]
    pairs = [(Image.open(tmp_path / f"{i}.png").convert("RGB"), candidates[i]) for i in range(2)]
    assert clip_score(model, pairs, batch_size=1) == pytest.approx(report["clipscore"], abs=1e-5)

    text = runner.invoke(app, args).stdout
    assert "fid: not computed (needs local weights: " in text and "fad: not computed (needs local weights: " in text

    no_media = runner.invoke(app, args[:8])  # --clip-model without --media
    assert no_media.exit_code == 2 and "needs --media" in no_media.stderr
