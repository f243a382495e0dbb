"""Turn the suite's results.jsonl into the Markdown rows of docs/benchmarks.md.

python benchmarks/suite_table.py /tmp/lipkit-gpu/results.jsonl --date 2026-12-01
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def throughput_rows(records: list[dict], date: str) -> list[str]:
    rows = [
        "| date | device | config | compile | OpenCLIP samples/s | lipkit samples/s | ratio | MFU OpenCLIP / lipkit "
        "| peak GiB OpenCLIP / lipkit | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        rate, mfu, peak = r["samples_per_s"], r.get("mfu") or {}, r.get("peak_gib") or {}
        mfu_s = f"{100 * mfu['openclip']:.1f}% / {100 * mfu['lipkit']:.1f}%" if mfu else "-"
        peak_s = f"{peak['openclip']:.1f} / {peak['lipkit']:.1f}" if peak else "-"
        mem = f"{r['ratio_peak_memory']:.2f}x" if r.get("ratio_peak_memory") else "-"
        rows.append(
            f"| {date} | {r['device']}, torch {r['torch']} | {r['model']}, batch {r['batch']}, {r['precision']} "
            f"| {'yes' if r['compile'] else 'no'} | {rate['openclip']:,.0f} | {rate['lipkit']:,.0f} "
            f"| **{r['ratio_samples_per_s']:.2f}x** | {mfu_s} | {peak_s} | {mem} |"
        )
    return rows


def loss_rows(records: list[dict], date: str) -> list[str]:
    rows = [
        "| date | device | loss | batch x dim | dtype | tile | seconds | loss memory | peak total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        for kind, m in r["results"].items():
            total = f"{m['total_mib'] / 1024:.2f} GiB" if m.get("total_mib") is not None else "-"
            rows.append(
                f"| {date} | {r['device']} | {r['loss']} ({kind}) | {r['batch']:,} x {r['dim']} | {r['dtype']} "
                f"| {r['tile']} | {m['seconds']:.2f} | {m['loss_mib'] / 1024:.2f} GiB | {total} |"
            )
    return rows


def accumulation_rows(records: list[dict], date: str) -> list[str]:
    rows = [
        "| date | device | model | effective batch / micro | precision, loss | s per step | samples/s "
        "| plain micro-batch steps | peak device memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        peak = f"{r['peak_device_gib']:.1f} GiB" if r.get("peak_device_gib") else "-"
        rows.append(
            f"| {date} | {r['device']}, torch {r['torch']} | {r['model']} | {r['effective_batch']:,} / "
            f"{r['micro_batch']} | {r['precision']}, {r['loss']} | {r['seconds_per_step']:.1f} "
            f"| {r['samples_per_s']:,.0f} | {r['plain_micro_batch_samples_per_s']:,.0f} | {peak} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--date", required=True)
    args = parser.parse_args()
    records = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    kinds = {
        "train_throughput": throughput_rows,
        "loss_memory": loss_rows,
        "accumulation": accumulation_rows,
    }
    for kind, rows in kinds.items():
        chosen = [r for r in records if r.get("benchmark") == kind]
        if chosen:
            print(f"\n{kind}\n")
            print("\n".join(rows(chosen, args.date)))


if __name__ == "__main__":
    main()
