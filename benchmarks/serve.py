"""One chat turn through `anyverse serve` (the official openai client, loopback) vs the same turn in process, and
latency with several concurrent clients, measured in one run.

Both sides run the same seeded turn (the script checks they reply the same), alternately, so neither competes with
the other for the CPU. Target: server / in-process <= 1.1 on the tiny profile with --llm-width 512 --llm-layers 8.

    python benchmarks/serve.py [--turns 5] [--llm-width 512 --llm-layers 8] [--clients 8 --per-client 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "1")

PROMPT = "describe a red circle on a blue square"


def start_server(overrides: list[str], max_queue: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mkdtemp(prefix="anyverse-bench-serve-")
    command = [str(Path(sys.executable).parent / "anyverse"), "serve", "--port", str(port), "--out", out,
               "--max-queue", str(max_queue), *[a for o in overrides for a in ("--set", o)]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return process, base
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not start")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--llm-width", type=int, default=None)
    parser.add_argument("--llm-layers", type=int, default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=2)
    args = parser.parse_args()

    import openai
    import torch
    from turn_overhead import scaled_llm  # this script's folder is on sys.path

    from anyverse.session import Anyverse

    torch.set_num_threads(1)
    overrides = scaled_llm(args.llm_width, args.llm_layers)
    session = Anyverse.from_profile("tiny", overrides, output_dir=tempfile.mkdtemp(prefix="anyverse-bench-"))
    process, base = start_server(overrides, max_queue=max(8, args.clients))
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)

    def in_process(seed: int) -> tuple[float, str]:
        session.reset()
        start = time.perf_counter()
        text = session.turn(PROMPT, seed=seed).text
        return time.perf_counter() - start, text

    def served(seed: int) -> tuple[float, str]:
        start = time.perf_counter()
        reply = client.chat.completions.create(model="anyverse", messages=[{"role": "user", "content": PROMPT}],
                                               seed=seed)
        return time.perf_counter() - start, reply.choices[0].message.content or ""

    try:
        in_process(0), served(0)  # warm-up: the server loads its model on the first chat
        local, remote, same = [], [], 0
        for turn in range(args.turns):
            (t_local, text_local), (t_remote, text_remote) = in_process(turn + 1), served(turn + 1)
            local.append(t_local)
            remote.append(t_remote)
            same += text_local == text_remote
        with ThreadPoolExecutor(args.clients) as pool:
            seeds = range(100, 100 + args.clients * args.per_client)
            started = time.perf_counter()
            latencies = [t for t, _ in pool.map(served, seeds)]
            wall = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(15)
    report = {
        "in_process_s_median": round(statistics.median(local), 4),
        "server_s_median": round(statistics.median(remote), 4),
        "server_over_in_process": round(statistics.median(remote) / statistics.median(local), 3),
        "same_replies": f"{same}/{args.turns}",
        "concurrent_clients": args.clients,
        "requests": len(latencies),
        "latency_p50_s": round(percentile(latencies, 0.5), 3),
        "latency_p95_s": round(percentile(latencies, 0.95), 3),
        "throughput_rps": round(len(latencies) / wall, 3),
        "llm": {"width": args.llm_width, "layers": args.llm_layers},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
