"""`anyverse serve` as a real process on a loopback port (tiny profile), driven by the official `openai` client."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import soundfile as sf
from PIL import Image

from anyverse.openai_parts import RequestError
from anyverse.serve.store import MediaStore
from anyverse.types import Media, Modality

KEY = "test-key"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, body, {"Authorization": f"Bearer {KEY}",
                                                 "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the module: key required, a queue of 4, a 1 MB body cap; signal mode, which makes every
    required modality on the tiny profile (meta mode there often makes only one of three)."""
    port, out = _free_port(), tmp_path_factory.mktemp("serve")
    log = open(out / "server.log", "w")  # noqa: SIM115 (closed at teardown)
    command = [str(Path(sys.executable).parent / "anyverse"), "serve", "--port", str(port), "--out", str(out / "media"),
               "--api-key", KEY, "--max-queue", "4", "--max-body-mb", "1", "--mode", "signal"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {(out / 'server.log').read_text()}")
            try:
                if _get(f"{base}/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        assert "Traceback" not in (out / "server.log").read_text(), (out / "server.log").read_text()


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def _health(server: str) -> dict[str, Any]:
    return json.loads(_get(f"{server}/health")[1])


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _png(entry: dict[str, Any]) -> Image.Image:
    url = entry["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))


def test_images_api_generates_and_edits_without_loading_the_llm(server: str, client: openai.OpenAI,
                                                                 sample_media: dict[str, bytes]) -> None:
    made = client.images.generate(prompt="a red circle", n=2, size="32x32", extra_body={"seed": 3})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json or ""))) for d in made.data or []]
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    again = client.images.generate(prompt="a red circle", n=1, size="32x32", extra_body={"seed": 3})
    assert (again.data or [])[0].b64_json == (made.data or [])[0].b64_json  # seed + index: reproducible
    by_url = client.images.generate(prompt="a red circle", response_format="url", size="32x32")
    status, body = _get((by_url.data or [])[0].url or "")  # signed: no header needed
    assert status == 200 and body.startswith(b"\x89PNG")
    edited = client.images.edit(image=("cat.png", sample_media["png"], "image/png"), prompt="darker",
                                size="32x32")
    assert Image.open(io.BytesIO(base64.b64decode((edited.data or [])[0].b64_json or ""))).size == (32, 32)
    assert _health(server)["model"] == "not loaded"
    with pytest.raises(openai.UnprocessableEntityError):
        client.images.generate(prompt="x", size="huge")


def test_models_wrong_key_and_unknown_model_are_refused(server: str, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["anyverse"]
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="anyverse", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "gpt-4o" in caught.value.message


def test_chat_takes_image_audio_video_and_returns_all_three(server: str, client: openai.OpenAI,
                                                            sample_media: dict[str, bytes]) -> None:
    content = [
        {"type": "text", "text": "describe these and make an image, a sound and a clip"},
        {"type": "image_url", "image_url": {"url": _data_url(sample_media["png"], "image/png")}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(sample_media["wav"]).decode(),
                                                "format": "wav"}},
        {"type": "video_url", "video_url": {"url": _data_url(sample_media["mp4"], "video/mp4")}},
    ]
    reply = client.chat.completions.create(model="anyverse", messages=[{"role": "user", "content": content}],
                                           modalities=["text", "image", "audio", "video"], seed=1)
    message = reply.choices[0].message
    extra = message.model_extra or {}
    assert isinstance(message.content, str)
    assert [e["anyverse_id"] for e in extra["images"]] == ["img_2"]  # img_1 is the input
    assert _png(extra["images"][0]).format == "PNG"
    assert message.audio is not None and message.audio.id and message.audio.expires_at > time.time()
    assert sf.info(io.BytesIO(base64.b64decode(message.audio.data))).samplerate > 0
    assert extra["audios"][0]["anyverse_id"] == "aud_2"
    video = extra["videos"][0]
    assert video["anyverse_id"] == "vid_2"
    status, body = _get(video["video_url"]["url"])  # a browser's <video src>: signed, no header
    assert status == 200 and body[4:8] == b"ftyp"
    assert _get(video["video_url"]["url"].replace("sig=", "sig=0"))[0] == 401
    key = {"Authorization": f"Bearer {KEY}"}  # with the key, media by name; never the turn log beside them
    assert _get(f"{server}/v1/media/{video['video_url']['url'].split('/')[-1].split('?')[0]}", key)[0] == 200
    assert _get(f"{server}/v1/media/turns.jsonl", key)[0] == 404
    assert reply.usage is not None and reply.usage.prompt_tokens > 0


def test_a_follow_up_edits_the_returned_image_by_its_id(server: str, client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="anyverse", messages=[{"role": "user", "content": "draw a cat"}],
                                           modalities=["text", "image", "audio"], seed=2)
    returned = first.choices[0].message
    extra = returned.model_extra or {}
    assistant = {"role": "assistant", "content": returned.content, "images": extra["images"],
                 "audio": {"id": returned.audio.id if returned.audio else ""}}
    follow_up = [{"role": "user", "content": "draw a cat"}, assistant,
                 {"role": "user", "content": "make img_1 darker and aud_1 louder"}]
    second = client.chat.completions.create(model="anyverse", messages=follow_up,
                                            modalities=["text", "image"], seed=3)
    assert [e["anyverse_id"] for e in (second.choices[0].message.model_extra or {})["images"]] == ["img_2"]
    misses = _health(server)["embedding_cache"]["misses"]
    client.chat.completions.create(model="anyverse", messages=follow_up, max_tokens=2)
    assert _health(server)["embedding_cache"]["misses"] == misses  # re-sent history is not encoded again
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="anyverse", messages=[
            {"role": "user", "content": "draw"}, {**assistant, "audio": {"id": "aud_9_0000"}},
            {"role": "user", "content": "again"}])
    assert "aud_9_0000" in caught.value.message


def test_streaming_sends_text_then_each_media_item_then_usage(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "paint something"}]
    whole = client.chat.completions.create(model="anyverse", messages=messages,
                                           modalities=["text", "image"], seed=5)
    chunks = list(client.chat.completions.create(
        model="anyverse", messages=messages, modalities=["text", "image"], seed=5, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == whole.choices[0].message.content
    media = [(c.choices[0].delta.model_extra or {}).get("images") for c in chunks if c.choices]
    assert [m[0]["anyverse_id"] for m in media if m] == ["img_1"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_stop_sequences_cut_the_reply_streamed_or_not(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "say something long"}]
    full = client.chat.completions.create(model="anyverse", messages=messages, seed=11)
    text = full.choices[0].message.content or ""
    assert len(text) > 12, text
    stop = text[8:11]
    cut = text[: text.find(stop)].strip()
    short = client.chat.completions.create(model="anyverse", messages=messages, seed=11, stop=[stop, "\x00zz"])
    assert short.choices[0].message.content == cut
    streamed = client.chat.completions.create(model="anyverse", messages=messages, seed=11, stop=stop,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip() == cut


def test_bad_input_gets_openai_errors_never_a_500(server: str, client: openai.OpenAI) -> None:
    bad_b64 = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="anyverse", messages=bad_b64)
    assert "invalid base64" in caught.value.message and "messages[0].content[0]" in caught.value.message
    big = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                   + "A" * 1_500_000}}]}]
    with pytest.raises(openai.APIStatusError) as too_big:
        client.chat.completions.create(model="anyverse", messages=big)
    assert too_big.value.status_code == 413 and "--max-body-mb" in too_big.value.message
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="anyverse", messages=[{"role": "user", "content": "x"}],
                                       temperature=9)
    status, body = _post(f"{server}/v1/chat/completions", b'{"model": "anyverse", "messages": [')
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    lone = b'{"model": "anyverse", "max_tokens": 4, "messages": [{"role": "user", "content": "a \\ud800 b"}]}'
    status, body = _post(f"{server}/v1/chat/completions", lone)
    assert status == 200 and isinstance(body["choices"][0]["message"]["content"], str)
    status, body = _post(f"{server}/v1/chat/completions", b'{"model": "anyverse", "messages": "hi"}')
    assert status == 422 and body["error"]["param"] == "messages"


def test_a_client_that_disconnects_mid_stream_stops_its_turn(server: str, client: openai.OpenAI) -> None:
    before = _health(server)["cancelled"]
    stream = client.chat.completions.create(model="anyverse", messages=[{"role": "user", "content": "go"}],
                                            modalities=["text", "image", "audio", "video"], seed=7,
                                            stream=True)
    next(iter(stream))
    stream.close()
    for _ in range(100):
        health = _health(server)
        if health["cancelled"] > before and not health["running"]:
            break
        time.sleep(0.1)
    assert health["cancelled"] == before + 1 and not health["running"]
    assert client.chat.completions.create(model="anyverse", messages=[{"role": "user", "content": "still up?"}],
                                          max_tokens=4).choices[0].message.content is not None


def test_eight_clients_on_a_queue_of_four_get_answers_or_429(client: openai.OpenAI) -> None:
    together = threading.Barrier(8)

    def ask(seed: int) -> tuple[int, str | None]:
        together.wait()
        try:
            reply = client.chat.completions.create(model="anyverse", seed=seed, modalities=["text", "image", "video"],
                                                   messages=[{"role": "user", "content": f"picture {seed}"}])
        except openai.RateLimitError as err:
            return 429, err.response.headers.get("retry-after")
        except openai.APIStatusError as err:
            return err.status_code, err.message
        extra = reply.choices[0].message.model_extra or {}
        assert [extra["images"][0]["anyverse_id"], extra["videos"][0]["anyverse_id"]] == ["img_1", "vid_1"]
        return 200, None

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429}, results
    assert statuses.count(200) >= 5 and statuses.count(429) >= 1, results
    assert all(int(after or 0) >= 1 for s, after in results if s == 429)


def test_a_host_beyond_loopback_without_a_key_is_refused() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ANYVERSE_API_KEY"}
    done = subprocess.run([str(Path(sys.executable).parent / "anyverse"), "serve", "--host", "0.0.0.0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--api-key" in done.stderr, done.stderr


def test_media_urls_and_audio_ids_expire(tmp_path: Path) -> None:
    store = MediaStore(tmp_path, ttl=0.2)
    path = tmp_path / f"{'ab' * 8}.wav"
    path.write_bytes(b"RIFF")
    media = Media(modality=Modality.AUDIO, path=path, sha256="ab" * 32, format="wav", original_name="x.wav",
                  id="aud_1")
    encoded = store.encoder("http://127.0.0.1:1/", frozenset())(media)
    assert store.resolve(encoded.url) == store.resolve(encoded.handle) == path.resolve()
    assert store.resolve("http://elsewhere.example/x.png") is None
    time.sleep(max(0.0, (encoded.expires_at or 0) - time.time()) + 0.1)  # whole seconds, as OpenAI gives them
    for ref in (encoded.url, encoded.handle):
        with pytest.raises(RequestError, match="expired"):
            store.resolve(ref)
