"""The embedding job under torchrun: two gloo ranks share the parts and give the local run's vectors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lipkit.config import to_dict
from lipkit.data.embeddings import open_embeddings
from lipkit.index.embed import EmbedOptions, embed_collection
from lipkit.index.encoder import QueryEncoder
from lipkit.models import create_model
from lipkit.train.checkpoint import save_checkpoint

DATA, LIMIT, BATCH, PART = "tuxpaint:all", 30, 8, 10


def _by_key(out):
    rows = {}
    for part in open_embeddings(out).iter_parts():
        for i, key in enumerate(part.keys):
            rows[key] = (part.vectors["image"][i], part.vectors["text"][i], part.metadata[i]["caption"])
    return rows


@pytest.mark.slow  # two processes that each import torch and join a process group
def test_two_torchrun_ranks_give_the_local_vectors(tmp_path):
    torch.manual_seed(0)
    encoder = QueryEncoder(create_model("micro"))
    options = EmbedOptions(DATA, tmp_path / "local", batch_size=BATCH, part_size=PART, limit=LIMIT, progress=False)
    embed_collection(encoder, options)
    checkpoint = tmp_path / "model.pt"
    model = encoder.model
    save_checkpoint(checkpoint, {"model": model.state_dict(), "step": 1, "model_config": to_dict(model.cfg)})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "lipkit.cli.main"]
    cmd += ["embed", str(checkpoint), "--data", DATA, "--limit", str(LIMIT), "--out-dir", str(tmp_path / "emb")]
    cmd += ["--batch-size", str(BATCH), "--part-size", str(PART), "--workers", "0", "--device", "cpu", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{LIMIT} items in 3 parts" in done.stdout and done.stdout.count("items in") == 1  # rank 0 reports
    emb = open_embeddings(tmp_path / "emb")
    assert emb.parts == ["part-00000", "part-00001", "part-00002"] and len(emb) == LIMIT
    rows, expected = _by_key(tmp_path / "emb"), _by_key(tmp_path / "local")
    assert list(rows) == list(expected)
    for key, (image, text, caption) in rows.items():
        np.testing.assert_allclose(image, expected[key][0], atol=1e-6)
        np.testing.assert_allclose(text, expected[key][1], atol=1e-6)
        assert caption == expected[key][2]
