"""The embedding job on a local Ray instance (Ray Data, a model actor pool) gives the local run's vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lipkit.data.embeddings import open_embeddings
from lipkit.index.embed import EmbedOptions, embed_collection
from lipkit.index.encoder import QueryEncoder
from lipkit.index.runners import RayRunner
from lipkit.models import create_model

DATA, LIMIT, BATCH, PART = "tuxpaint:all", 30, 8, 10


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return QueryEncoder(create_model("micro"))


@pytest.fixture(scope="module")
def local(encoder, tmp_path_factory):
    """The vectors of a plain local run, by key."""
    out = tmp_path_factory.mktemp("local")
    options = EmbedOptions(DATA, out, batch_size=BATCH, part_size=PART, limit=LIMIT, progress=False)
    assert embed_collection(encoder, options).embedded == LIMIT
    return _by_key(out)


def _by_key(out):
    rows = {}
    for part in open_embeddings(out).iter_parts():
        for i, key in enumerate(part.keys):
            rows[key] = (part.vectors["image"][i], part.vectors["text"][i], part.metadata[i]["caption"])
    return rows


def _assert_same(rows, expected):
    assert list(rows) == list(expected)
    for key, (image, text, caption) in rows.items():
        np.testing.assert_allclose(image, expected[key][0], atol=1e-6)
        np.testing.assert_allclose(text, expected[key][1], atol=1e-6)
        assert caption == expected[key][2]


@pytest.mark.xdist_group("ray")  # one worker, one Ray instance (ray_local), under `pytest -n 2 --dist loadgroup`
@pytest.mark.slow  # the actor pool's processes import torch: tens of seconds on a loaded machine
def test_ray_data_gives_the_local_vectors(encoder, local, tmp_path, ray_local):
    runner = RayRunner("local", torch.device("cpu"), actors=1)
    options = EmbedOptions(DATA, tmp_path / "emb", batch_size=BATCH, part_size=PART, limit=LIMIT, progress=False)
    summary = embed_collection(encoder, options, runner)
    runner.close()
    assert (summary.embedded, summary.parts) == (LIMIT, 3)
    _assert_same(_by_key(tmp_path / "emb"), local)
