"""Peak RSS of a text-only turn vs the encoder + LLM alone: generators must load lazily (target <= 1.1x).

Each measurement runs in a fresh process, both in this one run.

    python benchmarks/lazy_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

BASELINE = """
import resource, torch
from anyverse.config import load_config
from anyverse.devices import resolve_device, resolve_dtype
from anyverse.model import AnyverseModel
config = load_config("tiny")
model = AnyverseModel.from_config(config, torch.device("cpu"), torch.float32, {})
context = model.render([])
model.llm.model.generate(inputs_embeds=model.embed(context), max_new_tokens=config.llm.max_new_tokens,
                         do_sample=True, pad_token_id=model.llm.tokenizer.pad_token_id)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

TEXT_TURN = """
import resource, sys, tempfile
from anyverse.session import Anyverse
session = Anyverse.from_profile("tiny", output_dir=tempfile.mkdtemp())
for seed in range(20):  # a random tiny LLM may ask for media on its own: take the first text-only turn
    result = session.turn("hello there", seed=seed)
    if not result.media and not session.generators.loaded():
        break
else:
    sys.exit("no text-only turn in 20 seeds")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_kib(code: str) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    os.environ.setdefault("ANYVERSE_HOME", tempfile.mkdtemp(prefix="anyverse-home-"))
    peak_rss_kib(TEXT_TURN)  # builds the tiny weights once, outside the measurement
    baseline = peak_rss_kib(BASELINE)
    turn = peak_rss_kib(TEXT_TURN)
    print(json.dumps({"encoder_llm_peak_mib": round(baseline / 1024, 1), "text_turn_peak_mib": round(turn / 1024, 1)}))
    print(f"text-only turn peak RSS / encoder+LLM alone: {turn / baseline:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
