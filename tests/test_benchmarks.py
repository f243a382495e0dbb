"""The benchmark scripts (run by hand and by benchmarks/gpu_suite.sh) still run: tiny sizes, CPU.

Every script in benchmarks/ runs here. Most of a tiny run is start-up (importing torch), so the scripts
run two at a time, one thread each: the whole file takes about half its CPU time on two cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lipkit.train.config import resolve_config
from lipkit.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
HELPERS = {"results.py"}  # imported by the scripts, not run

# script -> (tiny arguments, text its output must contain), for the scripts no other test below runs
SMOKE = {
    "loader.py": (
        ["--model", "tiny", "--images", "8", "--shards", "2", "--batch-size", "4", "--rounds", "1"],
        "ratio lipkit/draft",
    ),
    "tokenizer_speed.py": (["--n", "200", "--batch-size", "50"], "outputs identical: (200, 77)"),
    "tower_features.py": (["--batch-size", "2", "--rounds", "1", "--batches", "1", "--no-bf16"], "x peer"),
    "quickstart_recipes.py": (["--list"], "baseline"),
    "index_scale.py": (["--n", "2000", "--queries", "50", "--clusters", "20"], "recall@10 1.000"),
    "search_server.py": (
        [
            "--items",
            "2000",
            "--seconds",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0.5",
            "--model",
            "micro",
            "--checkpoint",
            "none",
            "--threads",
            "1",
        ],
        "ratio http/in-process",
    ),
    "curation_match.py": (
        ["--entries", "2000", "--captions", "300", "--plain-captions", "20"],
        "matches identical on 20 captions",
    ),
    "embed_overhead.py": (["--model", "micro", "--items", "16", "--workers", "0", "--rounds", "1"], "job/forward"),
    "download.py": (["--urls", "40", "--images", "8", "--throttle", "1m", "--skip-img2dataset"], "40 fetched"),
    "remote_shards.py": (
        ["--images", "16", "--shards", "2", "--batch-size", "4", "--workers", "0", "--rounds", "1", "--throttle", "4m"],
        "prefetch gain",
    ),
    "curation_semdedup.py": (
        ["--n", "3000", "--exhaustive-n", "2000", "--dim", "32", "--topics", "50"],
        "ratio lipkit/exhaustive",
    ),
    "search_route.py": (["--items", "200", "--requests", "20", "--rounds", "1"], "ratio fastapi/lipkit"),
    "huge_pages.py": (["--argv", "models"], "lipkit models"),
    "caption_speed.py": (
        ["--layers", "1", "--batch-size", "2", "--length", "8", "--rounds", "1"],
        "captions identical: True (2, 8)",
    ),
}
RUN_BY_NAME = {"train_throughput.py", "accumulation.py", "loss_memory.py", "block_cost.py", "suite_table.py"}
RUN_BY_NAME.add("train_memory.py")  # the scripts the other tests run


def start(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a benchmark script to completion with one intra-op thread."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)


def run_all(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Run the commands (a script and its arguments) two at a time; each must succeed."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(lambda command: start(*command), commands))
    for command, process in zip(commands, done):
        assert process.returncode == 0, f"{' '.join(command)}: {process.stdout}{process.stderr}"
    return done


def run(script: str, *args: str) -> str:
    return run_all([script, *args])[0].stdout


@pytest.mark.slow
def test_benchmarks_write_results_the_table_script_reads(tmp_path):
    files = [tmp_path / f"{name}.jsonl" for name in ("throughput", "accumulation", "loss", "block")]
    outs = [done.stdout for done in run_all(
        ["train_throughput.py", "--model", "micro", "--batch-size", "8", "--rounds", "1", "--steps", "1", "--trainer",
         "--json", str(files[0])],
        ["accumulation.py", "--model", "micro", "--batch-size", "24", "--micro", "8", "--json", str(files[1])],
        ["loss_memory.py", "--batch-size", "512", "--tile", "128", "--loss", "siglip", "--json", str(files[2])],
        ["block_cost.py", "--width", "64", "--heads", "4", "--tokens", "50", "--batch-size", "2", "--rounds", "1",
         "--json", str(files[3])],
    )]  # fmt: skip
    assert "ratio lipkit/openclip" in outs[0] and "ratio lipkit train_step/openclip" in outs[0]
    assert "one optimizer step" in outs[1]
    difference = float(re.search(r"\|loss difference\| (\S+)", outs[2]).group(1))
    assert difference < 1e-5  # the streaming loss equals the plain one
    assert "ratio lean/plain" in outs[3]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(path.read_text() for path in files))
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


@pytest.mark.slow
def test_memory_benchmark_counts_both_sides_without_allocating(tmp_path):
    args = ["--model", "tiny", "--batch-size", "64"]
    policies = ("cuda", "cpu")
    runs = [
        ["train_memory.py", *args, "--autocast-policy", p, "--json", str(tmp_path / f"{p}.jsonl")] for p in policies
    ]
    assert all("ratio lipkit/openclip" in done.stdout for done in run_all(*runs))
    cuda, cpu = [json.loads((tmp_path / f"{p}.jsonl").read_text()) for p in policies]
    ours, theirs = cuda["peak_gib"]["lipkit"], cuda["peak_gib"]["openclip"]
    assert ours["parameters"] == theirs["parameters"] > 0  # the same architecture on both sides
    # lipkit's MLPs and LayerNorms keep less for the backward pass (tests/models/test_lean_layers.py).
    assert ours["activations"] < 0.6 * theirs["activations"]
    assert cuda["ratio_peak_memory"] == ours["total"] / theirs["total"] < 0.9
    # CUDA's rule (float32 LayerNorm on an upcast copy) costs OpenCLIP's bf16 image tower; lipkit's
    # LayerNorm does its own float32 computation and is counted the same under both rules.
    assert theirs["activations"] > cpu["peak_gib"]["openclip"]["activations"]
    assert ours == cpu["peak_gib"]["lipkit"]


@pytest.mark.slow
@pytest.mark.exhaustive
def test_accumulation_memory_is_counted_with_the_host_batch_set_apart(tmp_path):
    args = ["--model", "tiny", "--precision", "bf16", "--count-memory", "--json"]
    _, old = run_all(
        ["accumulation.py", "--batch-size", "256", "--micro", "64", *args, str(tmp_path / "big.jsonl")],
        # one micro-batch: a plain step; the old spelling of --batch-size still works, with a notice
        ["accumulation.py", "--batch", "64", "--micro", "64", *args, str(tmp_path / "small.jsonl")],
    )
    assert "accumulation.py: --batch is deprecated, use --batch-size" in old.stderr.splitlines()
    big, small = (json.loads((tmp_path / f"{n}.jsonl").read_text())["peak_gib"] for n in ("big", "small"))
    assert big["inputs"] == 4 * small["inputs"] > 0  # the host batch grows with the effective batch...
    assert big["device"] < big["total"]  # ...and is set apart: the device holds one micro-batch of it
    assert big["device"] < 1.25 * small["total"]  # four times the batch, about one micro-batch's memory


@pytest.mark.slow
def test_every_script_runs_at_a_tiny_size(tmp_path):
    overrides = [f"out_dir={tmp_path}", "name=v", "steps=1", "progress=false", "tensorboard=false", "device=cpu"]
    train(resolve_config("tiny-synthetic", overrides=overrides))  # a recipe run for recipe_retrieval.py to read
    recipe_args = ["--out-dir", str(tmp_path), "--variant", "v", "--seeds", "1", "--data", "synthetic:val"]
    smoke = {**SMOKE, "recipe_retrieval.py": (recipe_args, "v: 512 pairs, R@1 image->text / text->image")}
    scripts = {path.name for path in (ROOT / "benchmarks").glob("*.py")}
    assert scripts - HELPERS == RUN_BY_NAME | set(smoke)  # a new script needs a run here
    done = run_all(*([script, *args] for script, (args, _) in smoke.items()))
    for (script, (_, expected)), process in zip(smoke.items(), done):
        assert expected in process.stdout, f"{script}: {process.stdout}"
