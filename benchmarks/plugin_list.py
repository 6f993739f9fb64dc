"""Time to list generator plugins: `anyverse generators list` (entry-point and package metadata, plugin classes read
from source, nothing imported) against `--check` (imports every plugin, so torch and diffusers) and a bare
interpreter, each in fresh processes; median wall and CPU seconds of several runs. The target is <= 0.5 s.

    python benchmarks/plugin_list.py [--runs 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "generators list": [sys.executable, "-c", "from anyverse.cli.app import main; main()", "generators", "list"],
    "generators list --check": [sys.executable, "-c", "from anyverse.cli.app import main; main()", "generators",
                                "list", "--check"],
}


def measure(command: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    medians = {}
    for label, command in COMMANDS.items():
        measure(command)  # warm: .pyc files and the page cache
        samples = [measure(command) for _ in range(runs)]
        medians[label] = (statistics.median(w for w, _ in samples), statistics.median(c for _, c in samples))
        print(f"{label:<26} wall {medians[label][0]:.3f} s   cpu {medians[label][1]:.3f} s   (median of {runs})")
    plain, checked = medians["generators list"], medians["generators list --check"]
    print(f"list / list --check: wall {plain[0] / checked[0]:.2f}, cpu {plain[1] / checked[1]:.2f}; "
          f"list <= 0.5 s: {'yes' if plain[0] <= 0.5 else 'no'} (wall), {'yes' if plain[1] <= 0.5 else 'no'} (cpu)")


if __name__ == "__main__":
    main()
