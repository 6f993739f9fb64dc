"""Peak memory of five generators used in turn (SD, Zeroscope, AudioLDM-2, InstructPix2Pix, VITS; tiny architectures
scaled to roughly 300 MB of weights each), with a memory budget that fits two of them vs no budget.

Each setting runs in a fresh process (peak RSS is per process); the weights are built once first, into
$ANYVERSE_HOME (default ~/.cache/anyverse; about 1.5 GB). Prints the weights' sizes, each run's peak RSS, what was
loaded at the end, and the ratio of the memory the generators added over the imports' baseline.

    python benchmarks/plugin_memory.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np

SCALED = [  # (entry, arch of its tiny build, per-request options): each about 300 MB of fp32 weights
    ("image", "{channels: [224, 448], text_hidden: 128}", {"steps": 1, "width": 32, "height": 32}),
    ("video", "{channels: [192, 384], text_hidden: 128}", {"steps": 1, "width": 32, "height": 32, "frames": 2}),
    ("audio", "{channels: [192, 384], vae_channels: [96, 192]}", {"steps": 1}),
    ("instruct-pix2pix", "{channels: [224, 448], text_hidden: 128}", {"steps": 1}),
    ("vits", "{hidden: 512, layers: 6}", {}),
]


def overrides(budget_gb: float) -> list[str]:
    arch = [f"generators.{name}.tiny={{seed: 0, arch: {spec}}}" for name, spec, _ in SCALED]
    return [*arch, f"runtime.generator_memory_gb={budget_gb}"]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(budget_gb: float) -> None:
    """Use the five generators in turn; print the peak RSS and what stayed loaded, as JSON."""
    import torch

    from anyverse.media import save_image
    from anyverse.session import Anyverse

    torch.set_num_threads(1)
    out = tempfile.mkdtemp()
    av = Anyverse.from_profile("tiny", overrides(budget_gb), output_dir=out)
    photo = save_image(np.random.default_rng(0).random((32, 32, 3)), out)
    baseline = rss_mb()
    sizes = {}
    for name, _, options in SCALED:
        source = photo if name == "instruct-pix2pix" else None
        av.generate("a red circle", generator=name, source=source, options={"seed": 0, **options})
        sizes[name] = av.generators.peek(name).memory_bytes() / 1e6
    print(json.dumps({"baseline_mb": baseline, "peak_mb": rss_mb(), "loaded": av.generators.loaded(),
                      "weights_mb": sizes}))


def run(budget_gb: float) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(budget_gb)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                               "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                               "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    unlimited = run(1000.0)  # also builds the weights on the first run
    unlimited = run(1000.0)
    sizes = unlimited["weights_mb"]
    two = sum(sorted(sizes.values())[-2:]) * 1.05 / 1024
    budgeted = run(two)
    print("weights (MB): " + ", ".join(f"{n} {s:.0f}" for n, s in sizes.items()))
    for label, result in (("no budget", unlimited), (f"budget {two:.2f} GB (two fit)", budgeted)):
        print(f"{label:<26} peak RSS {result['peak_mb']:7.0f} MB (baseline {result['baseline_mb']:.0f} MB), "
              f"loaded at the end: {', '.join(result['loaded'])}")
    added = {k: r["peak_mb"] - r["baseline_mb"] for k, r in (("none", unlimited), ("two", budgeted))}
    print(f"memory the generators added: budget / no budget = {added['two']:.0f} / {added['none']:.0f} MB = "
          f"{added['two'] / added['none']:.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(float(sys.argv[2]))
    else:
        main()
