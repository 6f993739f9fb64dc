"""The OpenAI content-part parser and response shapes shared by batch and serve."""

from __future__ import annotations

import base64
import http.server
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from anyverse.config import Caps
from anyverse.openai_parts import (
    Encoded,
    MediaSources,
    RequestError,
    http_fetcher,
    media_delta,
    media_fields,
    parse_chat,
    parse_modalities,
)
from anyverse.types import Media, Modality


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), side: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(seconds: float = 0.2, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, 0.3 * np.sin(np.arange(int(seconds * rate)) / 5.0), rate, format="WAV")
    return buf.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def sources(tmp_path: Path) -> MediaSources:
    return MediaSources(caps=Caps(), directory=tmp_path / "uploads")


def user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def refused(messages: list, sources: MediaSources, status: int, *words: str) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_chat(messages, sources)
    assert caught.value.status == status, caught.value.message
    assert "\n" not in caught.value.message
    for word in words:
        assert word in caught.value.message
    return caught.value


def test_every_content_part_becomes_validated_media_with_session_ids(sources: MediaSources,
                                                                       sample_media: dict[str, bytes]) -> None:
    wav = base64.b64encode(wav_bytes()).decode()
    messages = [
        {"role": "developer", "content": "be brief"},
        user(text("look at these"),
             {"type": "image_url", "image_url": {"url": data_url(png_bytes(), "image/png"), "detail": "low"}},
             {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
             {"type": "video_url", "video_url": {"url": data_url(sample_media["mp4"], "video/mp4")}}),
        {"role": "assistant", "content": [{"type": "text", "text": "seen"}]},
        user({"type": "file", "file": {"file_data": data_url(png_bytes((0, 0, 255)), "image/png"),
                                       "filename": "../../etc/blue.png"}},
             {"type": "audio_url", "audio_url": {"url": data_url(wav_bytes(0.3), "audio/wav")}},
             text("compare img_1 with img_2 and aud_2")),
    ]
    parsed = parse_chat(messages, sources, ["text", "image"])
    assert [m.role for m in parsed.messages] == ["system", "user", "assistant", "user"]
    assert parsed.messages[0].text == "be brief"
    first, last = parsed.messages[1].media, parsed.messages[3].media
    assert [(m.id, m.modality, m.format) for m in first] == [
        ("img_1", Modality.IMAGE, "png"), ("aud_1", Modality.AUDIO, "wav"), ("vid_1", Modality.VIDEO, "mp4")]
    assert [(m.id, m.modality) for m in last] == [("img_2", Modality.IMAGE), ("aud_2", Modality.AUDIO)]
    assert last[0].original_name == "blue.png"  # a name is a label, never a path
    for item in first + last:  # written content-addressed inside the given directory
        assert item.path.parent == sources.directory.resolve() and item.path.stem == item.sha256[:16]
    assert parsed.require == {Modality.IMAGE}


def test_returned_media_round_trip_keeps_ids_and_bytes(sources: MediaSources, tmp_path: Path,
                                                      sample_media: dict[str, bytes]) -> None:
    """What media_fields hands out (data URLs, or an audio id the caller resolves) reads back as the same media."""
    made = [Media(modality=m.modality, path=m.path, sha256=m.sha256, format=m.format, original_name="x", id=i)
            for m, i in ((sources_media(sources, png_bytes(), Modality.IMAGE), "img_1"),
                         (sources_media(sources, wav_bytes(), Modality.AUDIO), "aud_1"),
                         (sources_media(sources, wav_bytes(0.4), Modality.AUDIO), "aud_2"),
                         (sources_media(sources, sample_media["mp4"], Modality.VIDEO), "vid_1"))]

    def encode(media: Media) -> Encoded:
        mime = {"png": "image/png", "wav": "audio/wav", "mp4": "video/mp4"}[media.format]
        return Encoded(url=data_url(media.path.read_bytes(), mime), handle=f"audio_{media.sha256[:12]}",
                       expires_at=123)

    fields = media_fields([(m, f"prompt {m.id}") for m in made], encode)
    assert fields["images"][0]["type"] == "image_url" and fields["images"][0]["anyverse_id"] == "img_1"
    assert fields["audio"] == fields["audios"][0]
    assert fields["audio"]["transcript"] == "prompt aud_1" and fields["audio"]["expires_at"] == 123
    assert base64.b64decode(fields["audios"][1]["data"]) == made[2].path.read_bytes()
    assert fields["videos"][0]["video_url"]["url"].startswith("data:video/mp4;base64,")
    assert media_delta(made[1], "p", encode) == {"audio": {**fields["audios"][0], "transcript": "p"}}
    assert list(media_delta(made[3], "p", encode)) == ["videos"]

    handles = {f"audio_{m.sha256[:12]}": m.path for m in made}
    by_id = MediaSources(caps=Caps(), directory=tmp_path / "other", resolve=handles.get)
    sent_back = {"role": "assistant", "content": "here", "images": fields["images"], "videos": fields["videos"],
                 "audio": {"id": fields["audio"]["id"]}}
    parsed = parse_chat([user(text("draw")), sent_back, user(text("make img_1 darker"))], by_id)
    assert [(m.id, m.sha256) for m in parsed.messages[1].media] == [
        ("img_1", made[0].sha256), ("aud_1", made[1].sha256), ("vid_1", made[3].sha256)]
    both = {**sent_back, "audios": fields["audios"]}  # audio repeats audios[0]: taken once
    parsed = parse_chat([user(text("draw")), both, user(text("again"))], by_id)
    assert [m.id for m in parsed.messages[1].media] == ["img_1", "aud_1", "aud_2", "vid_1"]
    error = refused([user(text("hi")), {"role": "assistant", "audio": {"id": "audio_gone"}}, user(text("x"))],
                    by_id, 400, "audio_gone", "messages[1].audio.id")
    assert error.param == "messages[1].audio.id"


def sources_media(sources: MediaSources, data: bytes, modality: Modality) -> Media:
    messages = parse_chat([user({"type": "file", "file": {"file_data": base64.b64encode(data).decode(),
                                                          "filename": "f"}})], sources).messages
    assert messages[0].media[0].modality is modality
    return messages[0].media[0]


@pytest.mark.parametrize(("part", "status", "words"), [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@notbase64@@"}}, 400, ["invalid base64"]),
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, 400, ["base64"]),
    ({"type": "image_url", "image_url": {"url": data_url(wav_bytes(), "image/png")}}, 400, ["expected image"]),
    ({"type": "image_url", "image_url": {"url": data_url(b"just text", "image/png")}}, 400, ["not a supported"]),
    ({"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}, 400, ["--allow-remote-media"]),
    ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, 400, ["'file'"]),
    ({"type": "image_url", "image_url": {"url": "/etc/passwd"}}, 400, ["'path'"]),
    ({"type": "image_url", "image_url": "data:image/png;base64"}, 400, ["no comma"]),
    ({"type": "file", "file": {"file_id": "file-123"}}, 400, ["file_data"]),
    ({"type": "input_image", "image_url": "x"}, 400, ["unknown content part type 'input_image'"]),
    ({"type": "image_url"}, 400, ["url"]),
])
def test_bad_parts_are_refused_with_where_and_why(sources: MediaSources, part: dict, status: int,
                                                  words: list[str]) -> None:
    refused([user(text("hi"), part)], sources, status, "messages[0].content[1]", *words)
    assert not list(sources.directory.glob("*")) if sources.directory.exists() else True


def test_caps_answer_413_before_decoding(tmp_path: Path) -> None:
    small = MediaSources(caps=Caps(max_file_bytes=1000, max_text_chars=50, max_attachments=1),
                         directory=tmp_path / "u")
    big = data_url(b"\x89PNG" + b"\0" * 5000, "image/png")
    refused([user({"type": "image_url", "image_url": {"url": big}})], small, 413, "max_file_bytes")
    refused([user(text("x" * 51))], small, 413, "max_text_chars")
    two = {"type": "image_url", "image_url": {"url": data_url(png_bytes(), "image/png")}}
    refused([user(two, two)], small, 413, "2 media items")
    bomb = MediaSources(caps=Caps(max_image_pixels=100), directory=tmp_path / "b")
    refused([user(two)], bomb, 413, "max_image_pixels")


def test_structure_errors_name_the_message(sources: MediaSources) -> None:
    refused([], sources, 422, "messages")
    refused([{"role": "user", "content": "x"}] * 257, sources, 413, "257 messages")
    refused([{"role": "tool", "content": "x"}], sources, 400, "'tool'", "messages[0].role")
    refused(["hello"], sources, 400, "messages[0]")
    refused([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,x"}}]}], sources, 400,
            "system content holds only text")
    refused([{"role": "system", "content": "only a system prompt"}], sources, 400, "no user message")
    refused([user(text("make img_3 darker"))], sources, 400, "img_3", "messages[0]")


def test_lone_surrogates_become_replacement_characters(sources: MediaSources) -> None:
    parsed = parse_chat([{"role": "user", "content": "bad \ud800 text"}], sources)
    assert parsed.messages[0].text == "bad \ufffd text"
    parsed.messages[0].text.encode("utf-8")


def test_modalities_become_the_required_outputs() -> None:
    assert parse_modalities(None) == frozenset()
    assert parse_modalities(["text", "audio", "video"]) == {Modality.AUDIO, Modality.VIDEO}
    for bad in (["smell"], "image", [1]):
        with pytest.raises(RequestError) as caught:
            parse_modalities(bad)
        assert caught.value.status == 422 and caught.value.param == "modalities"


def test_paths_and_file_urls_only_under_the_allowed_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes())
    (tmp_path / "outside.png").write_bytes(png_bytes())
    rooted = MediaSources(caps=Caps(), directory=tmp_path / "u", allowed_root=root)
    for url in ("a.png", str(root / "a.png"), (root / "a.png").as_uri()):
        parsed = parse_chat([user({"type": "image_url", "image_url": {"url": url}})], rooted)
        assert parsed.messages[0].media[0].path == (root / "a.png").resolve()
    for url in ("../outside.png", (tmp_path / "outside.png").as_uri()):
        refused([user({"type": "image_url", "image_url": {"url": url}})], rooted, 400, "outside the allowed roots")


def test_remote_urls_are_fetched_only_when_allowed_and_within_caps(tmp_path: Path) -> None:
    body = png_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/pic.png"
    try:
        allowed = MediaSources(caps=Caps(), directory=tmp_path / "u", fetch=http_fetcher(10_000, 5.0))
        parsed = parse_chat([user({"type": "image_url", "image_url": {"url": url}})], allowed)
        assert parsed.messages[0].media[0].original_name == "pic.png"
        tight = MediaSources(caps=Caps(), directory=tmp_path / "u", fetch=http_fetcher(len(body) - 1, 5.0))
        refused([user({"type": "image_url", "image_url": {"url": url}})], tight, 413, "byte cap")
    finally:
        server.shutdown()
