"""The embedding loop: order across batches, one column per field, and image features against a plain reference."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from lipkit.errors import LipkitError
from lipkit.eval.embed import embed_dataset, keep_column
from lipkit.eval.features import image_features
from lipkit.models import create_model, image_transform


class Squares(Dataset):
    """Sample i is (tensor([i]), i * i)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(index)]), index * index


class Images:
    """A labelled image set of flat colours."""

    def __init__(self) -> None:
        self.classnames = ["dark", "light"]

    def __len__(self) -> int:
        return 5

    def image(self, index: int) -> Image.Image:
        return Image.new("RGB", (40, 30), (40 * index, 255 - 50 * index, 90))

    def label(self, index: int) -> int:
        return index % 2


def test_embed_dataset_keeps_dataset_order_across_batches():
    columns = (lambda x: 2 * x, keep_column)
    doubled, squares = embed_dataset(torch.nn.Identity(), Squares(7), columns, 3, 0, "cpu", False)
    assert doubled.flatten().tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    assert squares.tolist() == [0, 1, 4, 9, 16, 25, 36]
    with pytest.raises(LipkitError, match="the dataset is empty"):
        embed_dataset(torch.nn.Identity(), Squares(0), (keep_column,), 3, 0, "cpu", False)


def test_image_features_match_images_embedded_one_by_one():
    torch.manual_seed(0)
    model = create_model("micro").eval()
    data = Images()
    feats, labels = image_features(model, data, batch_size=2, progress=False)
    transform = image_transform(model.cfg)
    with torch.no_grad():
        want = torch.cat([model.encode_image(transform(data.image(i))[None], normalize=True) for i in range(5)])
    assert labels.tolist() == [0, 1, 0, 1, 0]
    torch.testing.assert_close(feats, want, atol=1e-6, rtol=0)
