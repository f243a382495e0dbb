"""A ``lipkit`` command with and without huge pages for large CPU tensors, one run after the other.

The CLI sets PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` unless the user has (``lipkit.cli.main.use_huge_pages``).
This runs the same command twice, each in a fresh process on its own empty cache (``LIPKIT_CACHE_DIR`` in a
temporary folder) and output folder: first with the variable at 0 (glibc's 4 KB pages), then at 1. Printed
for each: wall time, user and system CPU, minor page faults (from ``getrusage`` of the child), and the ratio
of the wall times. ``{out}`` in the command is replaced by the run's output folder.

    python benchmarks/huge_pages.py                                  # lipkit quickstart, about 20 minutes
    python benchmarks/huge_pages.py --argv train tiny-synthetic --set steps=50 out_dir={out}
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import append_result


def run_once(argv: list[str], huge: bool) -> dict[str, float]:
    """Run ``lipkit ARGV`` on an empty cache with huge pages on or off; its wall time, CPU and faults."""
    tmp = Path(tempfile.mkdtemp(prefix="huge_pages."))
    try:
        args = [a.replace("{out}", str(tmp / "out")) for a in argv]
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1" if huge else "0", "LIPKIT_CACHE_DIR": str(tmp / "cache")}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "lipkit.cli.main", *args], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"lipkit {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {
        "wall_s": round(wall, 2),
        "user_s": round(after.ru_utime - before.ru_utime, 2),
        "system_s": round(after.ru_stime - before.ru_stime, 2),
        "minor_faults": after.ru_minflt - before.ru_minflt,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--argv",
        nargs=argparse.REMAINDER,
        default=["quickstart", "--out-dir", "{out}"],
        help="the lipkit command and its arguments (default: quickstart --out-dir {out}); give it last",
    )
    parser.add_argument("--json", help="append the results to this file as one JSON line")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        print("transparent huge pages are a Linux feature: nothing to compare here")
        return 0
    rows = {}
    for label, huge in (("4 KB pages", False), ("huge pages", True)):
        rows[label] = row = run_once(args.argv, huge)
        print(
            f"{label}: wall {row['wall_s']:.1f} s, user {row['user_s']:.1f} s, system {row['system_s']:.1f} s, "
            f"{row['minor_faults']:,} minor page faults"
        )
    ratio = rows["4 KB pages"]["wall_s"] / rows["huge pages"]["wall_s"]
    print(f"speed-up huge/4KB (wall): {ratio:.2f}x  (lipkit {' '.join(args.argv)})")
    append_result(
        args.json,
        "huge_pages",
        {
            "command": args.argv, **rows, "speedup": round(ratio, 3), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        },
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
