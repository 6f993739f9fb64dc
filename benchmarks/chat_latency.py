"""Chat responsiveness, measured in one run on the tiny profile.

1. Enter -> first streamed token through the chat (``anyverse.cli.chat.Chat.handle``, as the REPL calls it), as a ratio
   to the model's own time to first token on the same context (``generate`` with one new token). Target <= 1.1.
2. Resuming a 20-turn conversation with 10 media from the log (read it, re-validate the media, one more turn) vs the
   same turn in the process that held the conversation. The model is loaded on both sides, untimed. Target <= 2.

    python benchmarks/chat_latency.py [--turns 10] [--llm-width 512 --llm-layers 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class FirstToken:
    """A chat front end that notes when the first text delta is shown."""

    def __init__(self) -> None:
        self.first: float | None = None

    def show(self, event) -> None:  # type: ignore[no-untyped-def]
        from anyverse.types import TextDelta

        if isinstance(event, TextDelta) and self.first is None:
            self.first = time.perf_counter()

    def info(self, text: str) -> None:
        pass

    error = info


def model_ttft(session, text: str) -> float:  # type: ignore[no-untyped-def]
    """The LLM's own time to first token: prefill of the rendered context plus one sampled token."""
    import torch

    embeds = session.model.embed(session.context([*session.history, session.prepare(text)]))
    start = time.perf_counter()
    with torch.inference_mode():
        session.model.llm.model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2],
                                         dtype=torch.long), max_new_tokens=1, do_sample=False,
                                         pad_token_id=session.model.llm.tokenizer.pad_token_id)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--llm-width", type=int, default=None)
    parser.add_argument("--llm-layers", type=int, default=None)
    args = parser.parse_args()

    import numpy as np
    import torch
    from anyverse.cli.chat import Chat, Settings
    from turn_overhead import scaled_llm

    from anyverse.logs import ConversationLog
    from anyverse.media import save_audio, save_image
    from anyverse.quiet import quiet_libraries
    from anyverse.session import Anyverse

    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="anyverse-chat-bench-"))
    os.environ["ANYVERSE_HOME"] = str(workdir / "home")
    overrides = scaled_llm(args.llm_width, args.llm_layers)
    with quiet_libraries():
        session = Anyverse.from_profile("tiny", overrides, output_dir=workdir / "out")
    log = ConversationLog(workdir / "logs.db")

    def start_log() -> str:
        return log.create("tiny", None, overrides, {}, session.config.fingerprint(), session.model.base_fingerprint())

    # 1. first token: through the chat vs the model alone, on the same conversation
    io = FirstToken()
    chat = Chat(session, io, log, None, Settings(seed=0), workdir / "media", start_log)
    chat.handle("hello")  # warm-up
    through_chat, alone = [], []
    for turn in range(args.turns):
        text = f"tell me about turn {turn}"
        alone.append(model_ttft(session, text))
        io.first = None
        enter = time.perf_counter()
        chat.handle(text)
        assert io.first is not None, "no text was streamed"
        through_chat.append(io.first - enter)
    ttft_chat, ttft_model = statistics.median(through_chat), statistics.median(alone)
    print(f"first token: chat {1000 * ttft_chat:.1f} ms, model alone {1000 * ttft_model:.1f} ms "
          f"-> ratio {ttft_chat / ttft_model:.2f}  (target <= 1.1)")

    # 2. a 20-turn conversation with 10 media, then one more turn: in process vs resumed from the log
    rng = np.random.default_rng(0)
    session.reset()
    chat = Chat(session, FirstToken(), log, None, Settings(seed=0), workdir / "media", start_log)
    for turn in range(20):
        if turn % 2 == 0:
            made = (save_image(rng.random((64, 64, 3)), workdir / "in") if turn % 4 == 0
                    else save_audio(rng.standard_normal(16000).astype(np.float32) * 0.1, 16000, workdir / "in"))
            chat.stage(str(made.path))
        chat.handle(f"message {turn}")
    cid = chat.cid
    assert cid is not None and sum(len(m.media) for m in session.history) >= 10
    in_process, resumed = [], []
    for attempt in range(3):
        start = time.perf_counter()
        session.turn("and one more", seed=attempt)
        in_process.append(time.perf_counter() - start)
        session.undo()
        with quiet_libraries():
            fresh = Anyverse(session.config, output_dir=workdir / "out", model=session.model)  # loaded, untimed
        start = time.perf_counter()
        fresh.restore(ConversationLog(workdir / "logs.db").history(cid))
        fresh.turn("and one more", seed=attempt)
        resumed.append(time.perf_counter() - start)
    same, back = statistics.median(in_process), statistics.median(resumed)
    print(f"next turn of a 20-turn, {sum(len(m.media) for m in session.history)}-media conversation: in process "
          f"{1000 * same:.0f} ms, resumed from the log {1000 * back:.0f} ms -> ratio {back / same:.2f}  (target <= 2)")


if __name__ == "__main__":
    main()
