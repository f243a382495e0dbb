"""Turn the suite's results.jsonl into the Markdown rows of docs/benchmarks.md.

python benchmarks/suite_table.py /tmp/lipkit-gpu/results.jsonl --date 2026-12-01
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path


def throughput(r: dict) -> Iterator[list[str]]:
    rate, mfu, peak = r["samples_per_s"], r.get("mfu") or {}, r.get("peak_gib") or {}
    yield [
        f"{r['device']}, torch {r['torch']}",
        f"{r['model']}, batch {r['batch']}, {r['precision']}",
        "yes" if r["compile"] else "no",
        f"{rate['openclip']:,.0f}",
        f"{rate['lipkit']:,.0f}",
        f"{rate['lipkit train_step']:,.0f}" if "lipkit train_step" in rate else "-",
        f"**{r['ratio_samples_per_s']:.2f}x**",
        f"{100 * mfu['openclip']:.1f}% / {100 * mfu['lipkit']:.1f}%" if mfu else "-",
        f"{peak['openclip']:.1f} / {peak['lipkit']:.1f}" if peak else "-",
        f"{r['ratio_peak_memory']:.2f}x" if r.get("ratio_peak_memory") else "-",
    ]


def loss(r: dict) -> Iterator[list[str]]:
    for kind, m in r["results"].items():
        yield [
            r["device"],
            f"{r['loss']} ({kind})",
            f"{r['batch']:,} x {r['dim']}",
            r["dtype"],
            str(r["tile"]),
            f"{m['seconds']:.2f}",
            f"{m['loss_mib'] / 1024:.2f} GiB",
            f"{m['total_mib'] / 1024:.2f} GiB" if m.get("total_mib") is not None else "-",
        ]


def accumulation(r: dict) -> Iterator[list[str]]:
    yield [
        f"{r['device']}, torch {r['torch']}",
        r["model"],
        f"{r['effective_batch']:,} / {r['micro_batch']}",
        f"{r['precision']}, {r['loss']}",
        f"{r['seconds_per_step']:.1f}",
        f"{r['samples_per_s']:,.0f}",
        f"{r['plain_micro_batch_samples_per_s']:,.0f}",
        f"{r['peak_device_gib']:.1f} GiB" if r.get("peak_device_gib") else "-",
    ]


def block_cost(r: dict) -> Iterator[list[str]]:
    ms, kept = r["ms"], r["kept_bytes_per_token"]
    yield [
        f"{r['device']}, torch {r['torch']}",
        f"width {r['width']}, {r['tokens']} tokens x {r['batch_size']}, {r['precision']}",
        f"{ms['plain']:.2f} / {ms['lean']:.2f}",
        f"**{r['ratio_time']:.3f}x**",
        f"{kept['plain'] / 1024:.1f} / {kept['lean'] / 1024:.1f} KiB",
        f"**{r['ratio_kept']:.3f}x**",
    ]


TABLES: dict[str, tuple[str, Callable[[dict], Iterator[list[str]]]]] = {  # Markdown header, cells of each row
    "train_throughput": (
        "device | config | compile | OpenCLIP samples/s | lipkit samples/s | lipkit train_step samples/s | ratio "
        "| MFU OpenCLIP / lipkit "
        "| peak GiB OpenCLIP / lipkit | memory ratio",
        throughput,
    ),
    "loss_memory": ("device | loss | batch x dim | dtype | tile | seconds | loss memory | peak total", loss),
    "accumulation": (
        "device | model | effective batch / micro | precision, loss | s per step | samples/s "
        "| plain micro-batch steps | peak device memory",
        accumulation,
    ),
    "block_cost": (
        "device | block | ms plain / lean | time ratio | kept per token plain / lean | kept ratio",
        block_cost,
    ),
}


def table(header: str, cells: Callable[[dict], Iterator[list[str]]], records: list[dict], date: str) -> str:
    """A Markdown table: a date column, then ``header``'s, one row per item ``cells`` yields."""
    lines = [f"| date | {header} |", "|" + "---|" * (header.count("|") + 2)]
    lines += ["| " + " | ".join([date, *row]) + " |" for r in records for row in cells(r)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--date", required=True)
    args = parser.parse_args()
    records = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    for kind, (header, cells) in TABLES.items():
        chosen = [r for r in records if r.get("benchmark") == kind]
        if chosen:
            print(f"\n{kind}\n")
            print(table(header, cells, chosen, args.date))


if __name__ == "__main__":
    main()
