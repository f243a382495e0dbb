"""The session's corpus: built-in items embedded once with a tiny random-weight model (see serve_helpers)."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import Corpus


@pytest.fixture(scope="session")
def corpus() -> Corpus:
    from lipkit.data.corpora import open_named
    from lipkit.index.encoder import QueryEncoder
    from lipkit.models import create_model

    torch.manual_seed(0)
    encoder = QueryEncoder(create_model("micro"), "cpu")
    keys, captions, sources, images = [], [], [], []
    for name in ("emoji", "tuxpaint"):
        pairs = open_named(f"{name}:all")
        for i in range(0, 12 * 7, 7):  # 12 items of each, spread over the corpus
            keys.append(pairs.key(i))
            captions.append(pairs.caption(i))
            sources.append(name)
            images.append(pairs.image(i))
    vectors = encoder.encode_images(images)
    return Corpus(keys, captions, sources, images, vectors, encoder, encoder.record)
