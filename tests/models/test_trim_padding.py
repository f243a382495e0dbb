"""Training batches drop the padding every text shares, where the text features stay the same."""

from __future__ import annotations

import pytest
import torch

import lipkit
from lipkit.models.factory import TrimPadding, batch_tokenizer, padding_trim_is_exact
from lipkit.models.text_inputs import TextTokens

CAPTIONS = ["a cat", "a small red fox jumping over a lazy brown dog in the snow", "tux"]


def test_batches_keep_the_longest_text_rounded_up_to_eight():
    tokenize = batch_tokenizer("tiny")
    full = lipkit.get_tokenizer("tiny")(CAPTIONS)
    trimmed = tokenize(CAPTIONS)
    longest = int((full != 0).sum(dim=1).max())  # start, words, end of text
    assert trimmed.shape[1] == -(-longest // 8) * 8 < full.shape[1]
    assert torch.equal(trimmed, full[:, : trimmed.shape[1]])
    assert not full[:, trimmed.shape[1] :].any()  # what was dropped was padding
    assert tokenize(["word " * 200]).shape[1] == full.shape[1]  # a full-length text keeps every position


@pytest.mark.parametrize("name", ["tiny", "micro", "ViT-B-32"])
def test_causal_towers_give_the_same_features_on_trimmed_tokens(name):
    assert padding_trim_is_exact(name)
    torch.manual_seed(0)
    model = lipkit.create_model(name, text={"layers": 2}).eval()
    full = lipkit.get_tokenizer(name)(CAPTIONS)
    with torch.no_grad():
        want = model.encode_text(full)
        got = model.encode_text(batch_tokenizer(name)(CAPTIONS))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_bidirectional_towers_are_not_trimmed():
    """Their tokens attend to the padding, so it changes their features: batches keep it."""
    bidirectional = lipkit.create_model("tiny", text={"causal": False})
    assert not padding_trim_is_exact(bidirectional.cfg)
    assert not isinstance(batch_tokenizer(bidirectional.cfg), TrimPadding)


def test_masked_tokens_trim_by_their_mask():
    """Ids with an attention mask (Hugging Face towers): the mask, not the pad id, says what is used."""
    ids = torch.tensor([[101, 7, 102, 0, 0, 0, 0, 0, 0, 0], [101, 102, 0, 0, 0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]])
    trimmed = TrimPadding(lambda texts: TextTokens(ids, mask), pad_id=7, multiple=2)(["x", "y"])
    assert isinstance(trimmed, TextTokens) and trimmed.shape == (2, 4)
    assert torch.equal(trimmed.ids, ids[:, :4]) and torch.equal(trimmed.mask, mask[:, :4])
