"""`lipkit serve` end to end: the command reloads the index's model from the checkpoint its record names,
serves until interrupted, and keeps the writes made meanwhile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from serve_helpers import free_port


def test_parser_builds_without_torch_or_fastapi():
    code = (
        "import sys; from lipkit.cli.main import build_parser; build_parser();"
        "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow  # a fresh interpreter loads torch and the model: ~20 s alone, a minute on a busy machine
def test_serve_command_end_to_end(corpus, tmp_path):
    from lipkit.index.encoder import QueryEncoder
    from lipkit.index.store import SearchIndex

    weights = tmp_path / "micro.pt"
    torch.save(corpus.encoder.model.state_dict(), weights)
    encoder = QueryEncoder(corpus.encoder.model, "cpu", checkpoint=weights, config="micro")
    metadata = [{"caption": c, "source": s} for c, s in zip(corpus.captions, corpus.sources, strict=True)]
    SearchIndex.build(tmp_path / "stamps", corpus.keys, corpus.vectors, metadata, record=encoder.record).close()
    (tmp_path / "token").write_text("s3cret\n")
    port = free_port()
    argv = [sys.executable, "-m", "lipkit.cli.main", "serve", "--index", str(tmp_path / "stamps"), "--port", str(port)]
    argv += ["--token-file", str(tmp_path / "token"), "--device", "cpu"]
    env = {**os.environ, "LIPKIT_SERVE_TOKEN": "", "LIPKIT_CACHE_DIR": str(tmp_path / "cache")}
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        found = httpx.get(f"{url}/api/indexes/stamps/similar", params={"key": corpus.keys[4], "k": 1}).json()
        assert found["results"][0]["key"] == corpus.keys[4]
        # text queries go through ONNX Runtime (the default where it is installed) and rank as PyTorch does
        text = "a red stamp"
        by_text = httpx.get(f"{url}/api/indexes/stamps/search", params={"q": text, "k": 5}).json()
        expected = np.argsort(-(corpus.vectors @ encoder.encode_texts([text])[0]))[:5]
        assert [hit["key"] for hit in by_text["results"]] == [corpus.keys[i] for i in expected]
        item = {"key": "cli/added", "vector": corpus.vectors[0].tolist(), "caption": "added through the CLI"}
        answer = httpx.post(
            f"{url}/api/indexes/stamps/items", json={"items": [item]}, headers={"Authorization": "Bearer s3cret"}
        )
        assert answer.json()["size"] == 25
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert f"stamps (text on onnx) at http://127.0.0.1:{port}/  writes on" in err
    assert SearchIndex.open(tmp_path / "stamps").contains("cli/added")


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"lipkit serve exited: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("lipkit serve did not come up")


def test_serve_command_errors_are_one_line(tmp_path, capsys):
    from lipkit.cli.main import main

    (tmp_path / "empty").write_text("")
    assert main(["serve", "--index", str(tmp_path / "nothing"), "--token-file", str(tmp_path / "empty")]) == 2
    assert "the token file" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-0.5", "11", "nan"])
def test_serve_refuses_a_batch_regroup_out_of_range(tmp_path, capsys, value):
    from lipkit.cli.main import main

    assert main(["serve", "--index", str(tmp_path / "nothing"), "--batch-regroup", value]) == 2
    err = capsys.readouterr().err
    assert "--batch-regroup must be between 0 and 10" in err and "Traceback" not in err
