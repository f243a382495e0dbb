"""The distributed loss forms, run in two gloo processes, against the single-process loss."""

from __future__ import annotations

import os
import socket
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lipkit.losses import create_loss


class Out:
    def __init__(self, image, text, scale, bias):
        self.image_features, self.text_features, self.logit_scale, self.logit_bias = image, text, scale, bias


def _data(n: int = 12, d: int = 6):
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64) + image, dim=-1)
    return image, text, torch.tensor(7.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)


def _reference(name: str):
    image, text, scale, bias = (t.clone().requires_grad_() for t in _data())
    loss = create_loss(name)(Out(image, text, scale, bias))
    loss.backward()
    return loss.detach(), image.grad, text.grad, scale.grad, bias.grad


def _worker(rank: int, world: int, port: int, name: str, queue, form: str, options: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    image, text, scale, bias = _data()
    b = image.shape[0] // world
    mine = slice(rank * b, (rank + 1) * b)
    local_image, local_text = image[mine].clone().requires_grad_(), text[mine].clone().requires_grad_()
    scale, bias = scale.clone().requires_grad_(), bias.clone().requires_grad_()
    loss = create_loss(form, **options)(Out(local_image, local_text, scale, bias))
    loss.backward()
    for grad in (scale.grad, bias.grad):  # what DDP does to parameter gradients: the mean over ranks
        if grad is not None:
            dist.all_reduce(grad)
            grad /= world
    total = loss.detach() / world
    dist.all_reduce(total)
    grads = (local_image.grad, local_text.grad, scale.grad, bias.grad)
    queue.put((rank, total.tolist(), *[None if g is None else g.tolist() for g in grads]))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "form", "world", "options"),
    [
        ("infonce", "infonce-distributed", 2, {}),
        ("siglip", "siglip-distributed", 2, {}),
        pytest.param("infonce", "infonce-streaming-distributed", 2, {"tile": 4}, marks=pytest.mark.exhaustive),
        ("infonce", "infonce-streaming-distributed", 3, {"tile": 3}),
        pytest.param("siglip", "siglip-ring", 2, {"tile": 4}, marks=pytest.mark.exhaustive),
        ("siglip", "siglip-ring", 3, {"tile": 3}),  # three ranks: the previous and next ranks differ
    ],
)
def test_gloo_ranks_match_one_process(name, form, world, options):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, name, queue, form, options)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    results = [[torch.tensor(x, dtype=torch.float64) if x is not None else None for x in r] for r in results]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    loss, g_image, g_text, g_scale, g_bias = _reference(name)
    close = partial(torch.testing.assert_close, atol=1e-10, rtol=1e-10)  # float64: the plain losses' tolerance
    for r in results:
        close(r[1], loss)
    # Each rank scales its share by the world size, so its feature gradients are world x the global ones.
    close(torch.cat([r[2] for r in results]) / world, g_image)
    close(torch.cat([r[3] for r in results]) / world, g_text)
    close(results[0][4], g_scale)
    if name == "siglip":
        close(results[0][5], g_bias)
    else:
        assert all(r[5] is None for r in results)
