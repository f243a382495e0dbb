"""``lipkit index``: build, add, delete, info and search from the command line, and one clear line per bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lipkit.cli.main import main
from lipkit.config import to_dict
from lipkit.data.embeddings import PartInfo, write_manifest, write_part
from lipkit.index.encoder import ModelRecord, QueryEncoder
from lipkit.index.query import combine
from lipkit.models import create_model
from lipkit.train.checkpoint import save_checkpoint

CAPTIONS = [f"a photo of object number {i}" for i in range(30)]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A micro model saved as a checkpoint, and its encoder with the record naming that checkpoint."""
    torch.manual_seed(0)
    model = create_model("micro")
    path = tmp_path_factory.mktemp("run") / "step_00000001.pt"
    save_checkpoint(path, {"model": model.state_dict(), "step": 1, "model_config": to_dict(model.cfg)})
    return QueryEncoder(model, "cpu", checkpoint=path.resolve())


def write_embeddings(folder, record: ModelRecord, keys: list[str], vectors: np.ndarray, source: str = "emoji"):
    """An embeddings folder of one part; the "image" vectors are whatever is given."""
    rows = {
        "key": keys,
        "caption": [f"caption of {k}" for k in keys],
        "source": [source if i % 2 == 0 else "tuxpaint" for i in range(len(keys))],
        "path": [None] * len(keys),
        "thumbnail": [b"\xff\xd8jpeg"] * len(keys),
        "width": [10 * i for i in range(len(keys))],
    }
    info = PartInfo(len(keys), "digest", {}, [])
    write_part(folder, "part-00000", {"image": vectors}, rows, info)
    manifest = {
        "format": "lipkit-embeddings", "version": 1, "model": record.to_dict(), "modalities": ["image"],
        "data": "test", "parts": {"part-00000": info.to_manifest()},
    }  # fmt: skip
    write_manifest(folder, manifest)
    return folder


@pytest.fixture
def index_dir(tmp_path, encoder):
    """An index built by the CLI whose item i holds the text embedding of CAPTIONS[i]."""
    keys = [f"item-{i}" for i in range(len(CAPTIONS))]
    emb = write_embeddings(tmp_path / "emb", encoder.record, keys, encoder.encode_texts(CAPTIONS))
    assert main(["index", "build", str(emb), "--out-dir", str(tmp_path / "idx")]) == 0
    return tmp_path / "idx"


def search(capsys, *argv: str) -> list[dict]:
    assert main(["index", "search", *argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_build_then_search_by_text_key_and_combination(index_dir, encoder, capsys):
    capsys.readouterr()
    hits = search(capsys, str(index_dir), "--text", CAPTIONS[7], "--k", "3")
    assert hits[0]["key"] == "item-7" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5) and len(hits) == 3
    assert hits[0]["metadata"] == {"caption": "caption of item-7", "source": "tuxpaint", "path": None, "width": 70}
    filtered = search(capsys, str(index_dir), "--key", "item-7", "--where", "source = emoji and width >= 100")
    assert filtered and all(h["metadata"]["source"] == "emoji" and h["metadata"]["width"] >= 100 for h in filtered)
    pages = [search(capsys, str(index_dir), "--key", "item-3", "--k", "4", "--offset", str(o)) for o in (0, 4)]
    full = search(capsys, str(index_dir), "--key", "item-3", "--k", "8")
    assert [h["key"] for h in pages[0] + pages[1]] == [h["key"] for h in full]
    steered = search(capsys, str(index_dir), "--text", CAPTIONS[2], "--minus-text", CAPTIONS[3], "--k", "30")
    stored = encoder.encode_texts(CAPTIONS)
    query = combine(list(encoder.encode_texts([CAPTIONS[2], CAPTIONS[3]])), [1.0, -1.0])
    assert [h["key"] for h in steered] == [f"item-{i}" for i in np.argsort(-(stored @ query), kind="stable")]
    assert main(["index", "search", str(index_dir), "--key", "item-3", "--k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split()[:3] == ["1", "1.0000", "item-3"]


def test_add_delete_and_info(index_dir, tmp_path, encoder, capsys):
    new = write_embeddings(
        tmp_path / "emb2", encoder.record, ["item-0", "new-1"], encoder.encode_texts(["a lemon", "a boat"])
    )
    assert main(["index", "add", str(index_dir), str(new)]) == 0
    assert "wrote 2 items (1 new), 31 in all" in capsys.readouterr().out
    assert search(capsys, str(index_dir), "--text", "a lemon", "--k", "1")[0]["key"] == "item-0"  # replaced
    (tmp_path / "gone.txt").write_text("item-5\n\nnew-1\n")
    assert main(["index", "delete", str(index_dir), "item-4", "nope", "--keys-file", str(tmp_path / "gone.txt")]) == 0
    assert "removed 3 of 4 keys, 28 items left" in capsys.readouterr().out
    assert main(["index", "info", str(index_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["items"], info["index_type"], info["recall_at_10"]) == (28, "IDMap2,Flat", 1.0)
    assert info["model"]["fingerprint"] == encoder.record.fingerprint
    assert main(["index", "info", str(index_dir)]) == 0
    out = capsys.readouterr().out
    assert "items:          28 image vectors of width 64" in out and "recall@10:      1.000" in out
    assert main(["index", "compact", str(index_dir)]) == 0 and "28 items" in capsys.readouterr().out


def test_bad_input_exits_2_with_one_line(index_dir, tmp_path, capsys):
    other = ModelRecord("f" * 64, 64, "micro", None)
    foreign = write_embeddings(tmp_path / "foreign", other, ["x"], np.eye(1, 64, dtype=np.float32))
    cases = [
        (["search", str(index_dir), "--key", "item-1", "--where", "colour = red"], "no column 'colour'"),
        (["search", str(index_dir), "--key", "item-1", "--k", "0"], "k=0 is out of range"),
        (["search", str(index_dir), "--key", "missing"], "has no item 'missing'"),
        (["search", str(index_dir)], "nothing to search by"),
        (["search", str(index_dir), "--image", str(tmp_path / "none.jpg")], "no such file"),
        (["info", str(tmp_path / "nowhere")], "is not a lipkit index"),
        (["add", str(index_dir), str(foreign)], f"not {'f' * 12}: use the index's own model"),
        (["delete", str(index_dir)], "no keys to delete"),
        (["build", str(foreign), "--out-dir", str(index_dir)], "already holds an index"),
        (["build", str(foreign), "--out-dir", str(tmp_path / "n"), "--memory-budget", "lots"], "is not a size"),
        (["build", str(tmp_path / "no-emb"), "--out-dir", str(tmp_path / "m")], "not an embeddings folder"),
    ]
    for argv, message in cases:
        assert main(["index", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)


PROBE = """
import sys
from lipkit.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("heavy:", sorted(m for m in ("torch", "faiss") if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def test_parsers_and_info_do_not_import_torch(index_dir):
    for argv, heavy in [(["index", "--help"], "[]"), (["index", "search", "--help"], "[]"),
                        (["index", "info", str(index_dir)], "['faiss']")]:  # fmt: skip
        done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stderr.splitlines()[-1] == f"heavy: {heavy}", done.stderr
