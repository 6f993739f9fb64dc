"""Dataset converters: each sample in datasets/samples becomes a manifest that reads back whole; bad rows counted."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from anyverse.media import save_video
from anyverse.train.convert import FORMATS, MAX_CAPTION_CHARS, convert
from anyverse.train.manifest import DialogRecord, PairRecord, SkipReport, read_manifest
from anyverse.types import Modality

SAMPLES = Path(__file__).resolve().parents[1] / "datasets" / "samples"


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 40, 40)).save(path)
    return path


def audio(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(1600, dtype=np.float32), 16000)
    return path


def video(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    media = save_video(np.zeros((2, 16, 16, 3), dtype=np.uint8), 8, path.parent)
    os.replace(media.path, path)
    return path


def read_back(path: Path, kind: type[PairRecord] | type[DialogRecord]) -> list:
    report = SkipReport(path)
    records = list(read_manifest(path, kind, report))
    assert not report.skipped, report.summary()
    return records


def test_cc3m_headerless_tsv_finds_img2dataset_files_by_row_index(tmp_path: Path) -> None:
    media = tmp_path / "cc3m"
    for name in ("00000/000000000.jpg", "00000/000000001.png", "00000/000000002.jpg", "00001/000000004.webp"):
        image(media / name)
    (media / "00000/000000000.txt").write_text("a red square on a dark background")  # img2dataset's sidecar
    out = tmp_path / "out" / "pairs.jsonl"

    report = convert("cc3m", SAMPLES / "cc3m.tsv", out, media)

    pairs = read_back(out, PairRecord)
    assert [(p.media, p.caption) for p in pairs] == [
        ("../cc3m/00000/000000000.jpg", "a red square on a dark background"),
        ("../cc3m/00000/000000001.png", "a green circle near the top"),
        ("../cc3m/00001/000000004.webp", '"quoted" words open this caption'),
    ]
    assert {p.modality for p in pairs} == {Modality.IMAGE}
    assert report.kept == 3 and report.skipped == {"empty caption": 1, "missing file": 1}
    assert "missing file (first: line 4: 000000003.jpg" in report.summary()


def test_laion_csv_uses_its_key_column_case_insensitively(tmp_path: Path) -> None:
    image(tmp_path / "00000/000000010.jpg")
    image(tmp_path / "00000/000000011.jpg")
    out = tmp_path / "laion.jsonl"

    report = convert("cc3m", SAMPLES / "laion.csv", out, tmp_path)

    assert [(p.media, p.caption) for p in read_back(out, PairRecord)] == [
        ("00000/000000010.jpg", "A photo of a cat on a sofa"),
        ("00000/000000011.jpg", "A pencil drawing of a dog"),
    ]
    assert report.skipped == {"missing file": 1, "unparseable row": 1}


def test_path_column_is_relative_to_the_media_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    one = image(root / "photos/one.png")
    image(root / "photos/two.png")
    out = tmp_path / "elsewhere" / "deep" / "pairs.jsonl"

    report = convert("cc3m", SAMPLES / "images.csv", out, root)

    [pair] = read_back(out, PairRecord)
    assert pair.media == "../../data/photos/one.png"
    assert (out.parent / pair.media).resolve() == one.resolve()
    assert report.skipped == {"missing file": 1, "empty caption": 1}


def test_webvid_page_dir_layout_or_flat(tmp_path: Path) -> None:
    video(tmp_path / "videos/001001_001050/1000001.mp4")
    video(tmp_path / "videos/1000002.mp4")
    video(tmp_path / "videos/001051_001100/1000004.mp4")
    video(tmp_path / "videos/001051_001100/1000005.mp4")
    out = tmp_path / "webvid.jsonl"

    report = convert("webvid", SAMPLES / "webvid.csv", out, tmp_path / "videos")

    assert [(p.media, p.caption, p.modality) for p in read_back(out, PairRecord)] == [
        ("videos/001001_001050/1000001.mp4", "Aerial view of a pine forest", Modality.VIDEO),
        ("videos/1000002.mp4", "Slow waves on a sandy beach", Modality.VIDEO),
        ("videos/001051_001100/1000005.mp4", 'Timelapse of "city" lights, at night', Modality.VIDEO),
    ]
    assert report.skipped == {"missing file": 1, "empty caption": 1}


def test_audiocaps_finds_audiocap_id_youtube_start_or_youtube_names(tmp_path: Path) -> None:
    audio(tmp_path / "audiocaps/train/91001.wav")  # audiocaps-download: {split}/{audiocap_id}
    audio(tmp_path / "audiocaps/aaaaaaaaaa2_170.flac")  # start_time 170.0 in the CSV
    audio(tmp_path / "audiocaps/aaaaaaaaaa4.wav")
    audio(tmp_path / "audiocaps/aaaaaaaaaa5.ogg")
    out = tmp_path / "audio.jsonl"

    report = convert("audiocaps", SAMPLES / "audiocaps.csv", out, tmp_path / "audiocaps")

    assert [(p.media, p.caption) for p in read_back(out, PairRecord)] == [
        ("audiocaps/train/91001.wav", "A woman talks while water pours into a sink"),
        ("audiocaps/aaaaaaaaaa2_170.flac", "Wind blows, and leaves rustle"),
        ("audiocaps/aaaaaaaaaa5.ogg", "An audience claps and cheers"),
    ]
    assert report.skipped == {"missing file": 1, "empty caption": 1}


def test_overlong_captions_are_skipped_and_counted(tmp_path: Path) -> None:
    audio(tmp_path / "1.wav")
    audio(tmp_path / "2.wav")
    source = tmp_path / "caps.csv"
    source.write_text(f"audiocap_id,caption\n1,{'x' * MAX_CAPTION_CHARS}\n2,{'y' * (MAX_CAPTION_CHARS + 1)}\n")

    report = convert("audiocaps", source, tmp_path / "out.jsonl")

    assert [len(p.caption) for p in read_back(tmp_path / "out.jsonl", PairRecord)] == [MAX_CAPTION_CHARS]
    assert report.skipped == {"caption too long": 1}
    assert report.examples["caption too long"] == "line 3: 1001 characters (max 1000)"


def test_t2m_raw_t2x_dialogs_request_the_captioned_media(tmp_path: Path) -> None:
    out = tmp_path / "t2m.jsonl"

    report = convert("nextgpt-t2m", SAMPLES / "nextgpt_t2x.json", out)

    dialogs = read_back(out, DialogRecord)
    assert [[(t.role, [(r.modality, r.prompt) for r in t.requests]) for t in d.messages] for d in dialogs] == [
        [("user", []), ("assistant", [(Modality.IMAGE, "a lighthouse on a rocky coast at dusk")])],
        [("user", []), ("assistant", [(Modality.AUDIO, "rain falls on a tin roof")])],
    ]
    assert dialogs[0].messages[0].text == "Could you show me a lighthouse on a rocky coast at dusk?"
    assert report.skipped == {"output media without caption": 1, "turns not alternating human/gpt": 1}


def test_processed_instruction_json_maps_placeholders_to_media_and_requests(tmp_path: Path) -> None:
    cat = image(tmp_path / "media/cc3m/000000000.jpg")
    image(tmp_path / "media/cc3m/000000001.jpg")
    out = tmp_path / "manifests" / "t2m.jsonl"

    report = convert("nextgpt-t2m", SAMPLES / "nextgpt_instruction_tuning.json", out, tmp_path / "media")

    generate, describe, storm = read_back(out, DialogRecord)
    assert generate.messages[1].text == "Of course, here it is."
    assert [(r.modality, r.prompt) for r in generate.messages[1].requests] == [
        (Modality.IMAGE, "a lighthouse on a rocky coast at dusk")]
    assert [t.text for t in describe.messages] == [
        "What is in this picture?", "A red square on a dark background.", "And in this one?",
        "A green circle near the top."]
    refs = [ref for turn in describe.messages for ref in turn.media]
    assert [(r.id, r.media, r.modality) for r in refs] == [
        ("img_1", "../media/cc3m/000000000.jpg", Modality.IMAGE),
        ("img_2", "../media/cc3m/000000001.jpg", Modality.IMAGE)]
    assert (out.parent / refs[0].media).resolve() == cat.resolve()
    assert [[(r.modality, r.prompt) for r in t.requests] for t in storm.messages] == [
        [], [(Modality.AUDIO, "rain falls on a tin roof")], [],
        [(Modality.IMAGE, "storm clouds over a field"), (Modality.AUDIO, "thunder rumbles in the distance")]]
    assert storm.messages[3].text == "Here are the clouds and the thunder"
    assert report.skipped == {"output media without caption": 1, "missing file": 1}


def test_mosit_accepts_the_processed_format_too(tmp_path: Path) -> None:
    image(tmp_path / "cc3m/000000000.jpg")
    image(tmp_path / "cc3m/000000001.jpg")
    report = convert("mosit", SAMPLES / "nextgpt_instruction_tuning.json", tmp_path / "m.jsonl", tmp_path)
    assert report.kept == 3


def test_mosit_raw_tags_become_attachments_and_captioned_requests(tmp_path: Path) -> None:
    image(tmp_path / "mosit/mosit_i_0000002_00.jpg")
    out = tmp_path / "mosit.jsonl"

    report = convert("mosit", SAMPLES / "mosit.json", out, tmp_path / "mosit")

    dolphins, holiday = read_back(out, DialogRecord)
    assert [t.text for t in dolphins.messages] == [
        "I have always liked dolphins.", "They are remarkable.", "How do they sound?", "Like this:"]
    assert [[(r.modality, r.prompt) for r in t.requests] for t in dolphins.messages] == [
        [], [(Modality.IMAGE, "a dolphin leaping out of the sea")], [],
        [(Modality.AUDIO, "dolphins clicking and whistling")]]
    assert not any(t.media for t in dolphins.messages)
    user = holiday.messages[0]
    assert user.text == "Here is my holiday photo what do you think?"
    assert [(r.id, r.media) for r in user.media] == [("img_1", "mosit/mosit_i_0000002_00.jpg")]
    assert [(r.modality, r.prompt) for r in holiday.messages[1].requests] == [
        (Modality.VIDEO, "waves rolling onto a beach at sunset")]
    assert report.skipped == {"output media without caption": 1, "missing file": 1}
    assert report.examples["output media without caption"] == "item 2: mosit_i_0000003_00.jpg"


def test_generated_media_take_ids_before_later_attachments(tmp_path: Path) -> None:
    image(tmp_path / "later.png")
    source = tmp_path / "mosit.json"
    source.write_text("""[{"image_list": [{"image_name": "made.jpg", "caption": "a red kite"}], "conversation": [
        {"from": "human", "value": "Draw a kite."}, {"from": "gpt", "value": "<Image>made.jpg</Image>"},
        {"from": "human", "value": "Mine looks like <Image>later.png</Image>"}, {"from": "gpt", "value": "Nice."}]}]""")

    convert("mosit", source, tmp_path / "out.jsonl")

    [dialog] = read_back(tmp_path / "out.jsonl", DialogRecord)
    assert [r.id for r in dialog.messages[2].media] == ["img_2"]  # img_1 is the kite the assistant made


def test_bad_json_items_are_counted_not_fatal(tmp_path: Path) -> None:
    source = tmp_path / "t2m.json"
    source.write_text('[1, {"conversation": "no list"}, {"conversation": [{"from": "robot", "value": "hi"}]}]')
    report = convert("nextgpt-t2m", source, tmp_path / "out.jsonl")
    assert report.kept == 0
    assert report.skipped == {"unparseable item": 1, "no conversation": 1, "unknown speaker": 1}
    assert (tmp_path / "out.jsonl").read_text() == ""


def test_summary_names_source_output_and_reasons(tmp_path: Path) -> None:
    report = convert("nextgpt-t2m", SAMPLES / "nextgpt_t2x.json", tmp_path / "o.jsonl")
    assert report.summary().startswith(f"nextgpt-t2m {SAMPLES / 'nextgpt_t2x.json'} -> {tmp_path / 'o.jsonl'}: "
                                       "2 records, skipped 2: 1 output media without caption (first: item 2: ")


def test_missing_source_unknown_format_and_missing_columns_fail_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.tsv: source file not found"):
        convert("cc3m", tmp_path / "nope.tsv", tmp_path / "out.jsonl")
    with pytest.raises(ValueError, match=r"unknown dataset format 'coco'; known: cc3m, webvid, audiocaps"):
        convert("coco", SAMPLES / "cc3m.tsv", tmp_path / "out.jsonl")
    with pytest.raises(ValueError, match=r"audiocaps.csv: WebVid needs videoid and name"):
        convert("webvid", SAMPLES / "audiocaps.csv", tmp_path / "out.jsonl")
    with pytest.raises(FileNotFoundError, match="no_media: media root is not a directory"):
        convert("webvid", SAMPLES / "webvid.csv", tmp_path / "out.jsonl", tmp_path / "no_media")
    with pytest.raises(ValueError, match="not a JSON file"):
        convert("mosit", SAMPLES / "webvid.csv", tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    assert FORMATS == ("cc3m", "webvid", "audiocaps", "nextgpt-t2m", "mosit")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed")
def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path) -> None:
    source = tmp_path / "laion.parquet"
    shutil.copy(SAMPLES / "laion.csv", source)
    with pytest.raises(ValueError, match=r"laion.parquet: reading parquet needs pyarrow .*pip install pyarrow"):
        convert("cc3m", source, tmp_path / "out.jsonl")
