"""The benchmark scripts (run by hand and by benchmarks/gpu_suite.sh) still run: tiny sizes, CPU."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_benchmarks_write_results_the_table_script_reads(tmp_path):
    results = tmp_path / "results.jsonl"
    out = run("train_throughput.py", "--model", "micro", "--batch-size", "8", "--rounds", "1", "--steps", "1",
              "--trainer", "--json", str(results))  # fmt: skip
    assert "ratio lipkit/openclip" in out and "ratio lipkit train_step/openclip" in out
    out = run("accumulation.py", "--model", "micro", "--batch", "24", "--micro", "8", "--json", str(results))
    assert "one optimizer step" in out
    out = run("loss_memory.py", "--batch", "512", "--tile", "128", "--loss", "siglip", "--json", str(results))
    difference = float(re.search(r"\|loss difference\| (\S+)", out).group(1))
    assert difference < 1e-5  # the streaming loss equals the plain one
    out = run("block_cost.py", "--width", "64", "--heads", "4", "--tokens", "50", "--batch-size", "2", "--rounds", "1",
              "--json", str(results))  # fmt: skip
    assert "ratio lean/plain" in out
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["benchmark"] for r in records] == ["train_throughput", "accumulation", "loss_memory", "block_cost"]
    assert records[3]["kept_bytes_per_token"] == {"lean": 24.5 * 64, "plain": 36.5 * 64}  # see test_lean_layers
    assert records[0]["samples_per_s"]["lipkit"] > 0 and records[0]["samples_per_s"]["openclip"] > 0
    assert records[1]["effective_batch"] == 24 and records[1]["seconds_per_step"] > 0
    table = run("suite_table.py", str(results), "--date", "2026-01-01")
    assert "| micro, batch 8, fp32 | no |" in table
    assert records[0]["samples_per_s"]["lipkit train_step"] > 0
    assert "| micro | 24 / 8 |" in table
    assert "siglip (plain)" in table and "siglip (streaming)" in table
    assert "| width 64, 50 tokens x 2, bf16 |" in table


def test_memory_benchmark_counts_both_sides_without_allocating(tmp_path):
    results = tmp_path / "memory.jsonl"
    for policy in ("cuda", "cpu"):
        args = ["--model", "tiny", "--batch-size", "64", "--autocast-policy", policy, "--json", str(results)]
        assert "ratio lipkit/openclip" in run("train_memory.py", *args)
    cuda, cpu = [json.loads(line) for line in results.read_text().splitlines()]
    ours, theirs = cuda["peak_gib"]["lipkit"], cuda["peak_gib"]["openclip"]
    assert ours["parameters"] == theirs["parameters"] > 0  # the same architecture on both sides
    # lipkit's MLPs and LayerNorms keep less for the backward pass (tests/models/test_lean_layers.py).
    assert ours["activations"] < 0.6 * theirs["activations"]
    assert cuda["ratio_peak_memory"] == ours["total"] / theirs["total"] < 0.9
    # CUDA's rule (float32 LayerNorm on an upcast copy) costs OpenCLIP's bf16 image tower; lipkit's
    # LayerNorm does its own float32 computation and is counted the same under both rules.
    assert theirs["activations"] > cpu["peak_gib"]["openclip"]["activations"]
    assert ours == cpu["peak_gib"]["lipkit"]


def test_accumulation_memory_is_counted_with_the_host_batch_set_apart(tmp_path):
    results = tmp_path / "acc.jsonl"
    args = ["--model", "tiny", "--precision", "bf16", "--count-memory", "--json", str(results)]
    run("accumulation.py", "--batch", "256", "--micro", "64", *args)
    run("accumulation.py", "--batch", "64", "--micro", "64", *args)  # one micro-batch: a plain step
    big, small = (json.loads(line)["peak_gib"] for line in results.read_text().splitlines())
    assert big["inputs"] == 4 * small["inputs"] > 0  # the host batch grows with the effective batch...
    assert big["device"] < big["total"]  # ...and is set apart: the device holds one micro-batch of it
    assert big["device"] < 1.25 * small["total"]  # four times the batch, about one micro-batch's memory
