"""Shards read from a web server (a real nginx on 127.0.0.1, range requests), from S3 (moto's server on
127.0.0.1) and through OpenCLIP's ``pipe:`` form: the same samples as the local copy, the index cached, and
training on them gives the same batches, with exact resume."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lipkit.data.pack import PackOptions, file_items, pack
from lipkit.data.shards import ShardPairs, is_remote, resolve_shards
from lipkit.data.spec import open_mixture
from lipkit.errors import LipkitError

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")
STAMPS = Path("/usr/share/tuxpaint/stamps")
PATTERN = "{00000..00002}.tar"


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> Path:
    """20 Tux Paint stamps with captions, packed into three shards (8, 8 and 4 samples)."""
    src = tmp_path_factory.mktemp("stamps")
    for i, path in enumerate(sorted(STAMPS.rglob("*.png"))[:20]):
        shutil.copy(path, src / f"{i:03d}.png")
        (src / f"{i:03d}.txt").write_text(f"a stamp of a {path.stem.replace('_', ' ')}")
    out = tmp_path_factory.mktemp("shards")
    pack(file_items(src), out, PackOptions(samples_per_shard=8, max_side=64), progress=False)
    return out


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LIPKIT_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def served(nginx, local_shards) -> str:
    """The shards and their stats files on nginx; the folder's URL."""
    for path in sorted(local_shards.iterdir()):
        nginx.put(f"remote-shards/{path.name}", path.read_bytes())
    return f"{nginx.url}/remote-shards"


def assert_same_samples(a: ShardPairs, b: ShardPairs) -> None:
    assert len(a) == len(b) == 20
    for i in range(len(a)):
        image_a, image_b = a.image(i), b.image(i)
        assert (a.key(i), a.caption(i)) == (b.key(i), b.caption(i))
        assert image_a.size == image_b.size and image_a.tobytes() == image_b.tobytes()


def test_http_shards_are_the_local_samples_and_their_index_is_cached(nginx, served, local_shards, fresh_cache):
    local = ShardPairs(resolve_shards(str(local_shards / PATTERN)), "local")
    url = f"{served}/{PATTERN}"
    assert is_remote(url) and not is_remote(str(local_shards))
    remote = open_mixture(url).sources[0]
    assert isinstance(remote, ShardPairs) and remote.remote == [True] * 3
    assert_same_samples(local, remote)
    whole = nginx.requests("remote-shards/00000.tar")
    ShardPairs(resolve_shards(url), "again")  # the index comes from the cache: a HEAD for the shard, no GET
    log = (nginx.run / "access.log").read_text().splitlines()
    again = [line for line in log if "/remote-shards/00000.tar " in line][whole:]
    assert again and all('"HEAD ' in line for line in again)
    folder = open_mixture(f"{served}/00001.tar").sources[0]
    assert len(folder) == 8 and folder.key(0) == local.key(8)


def test_a_prefetched_batch_is_read_without_another_request(nginx, served, local_shards, fresh_cache):
    local = ShardPairs(resolve_shards(str(local_shards / PATTERN)), "local")
    remote = ShardPairs(resolve_shards(f"{served}/{PATTERN}"), "remote")
    batch = [3, 17, 9, 0, 12]  # across the three shards
    before = sum(nginx.requests(f"remote-shards/0000{s}.tar") for s in range(3))
    remote.prefetch(batch)
    fetched = sum(nginx.requests(f"remote-shards/0000{s}.tar") for s in range(3)) - before
    assert fetched == len(batch)  # one range request per sample, image and caption together
    for i in reversed(batch):  # caption first, then the image: both come out of the fetched span
        assert remote.caption(i) == local.caption(i)
        assert remote.image(i).tobytes() == local.image(i).tobytes()
    assert sum(nginx.requests(f"remote-shards/0000{s}.tar") for s in range(3)) - before == len(batch)
    remote.image(4)  # not prefetched: read on its own
    assert sum(nginx.requests(f"remote-shards/0000{s}.tar") for s in range(3)) - before == len(batch) + 1


def test_a_subset_of_remote_shards_is_fetched_ahead_by_its_own_indexes(served, fresh_cache, monkeypatch):
    from lipkit.data.labelled import Subset
    from lipkit.data.loader import TransformedPairs

    remote = ShardPairs(resolve_shards(f"{served}/{PATTERN}"), "remote")
    # what retrieval during training hands to the loader: a subset of the source (here of a subset)
    subset = Subset(Subset(remote, [19, 2, 11, 5]), [3, 1, 0])
    subset.prefetch([0, 2])
    assert set(remote._prefetched) == {5, 19}
    hints, fetch = [], remote.prefetch
    monkeypatch.setattr(remote, "prefetch", lambda indexes: hints.append(list(indexes)) or fetch(indexes))
    batch = TransformedPairs(subset, lambda image: image.size).__getitems__([0, 1, 2])
    assert hints == [[5, 2, 19]]
    assert [caption for _, caption in batch] == [remote.caption(i) for i in (5, 2, 19)]


def test_every_remote_session_is_closed_before_a_fork_and_a_child_fetches_at_once(served, fresh_cache):
    import multiprocessing as mp
    import weakref

    from lipkit.data import shards

    # two readers of the same shards: fsspec's file systems of equal arguments compare equal, yet each has a session
    first, second = (ShardPairs(resolve_shards(f"{served}/{PATTERN}"), name) for name in ("a", "b"))
    first.caption(0), second.caption(1)
    systems = [first._fs["http"], second._fs["http"]]
    assert systems[0] is not systems[1] and systems[0] == systems[1]
    shards._close_remote_sessions()  # what runs before every fork
    assert [fs._session for fs in systems] == [None, None]
    closers = [f for f in list(weakref.finalize._registry) if f.peek() and f.peek()[0] in systems]
    assert closers == []  # in a child, a closer of the parent's session waits on the parent's event loop

    def child(queue):  # a loader worker's first batch
        start = time.perf_counter()
        second.prefetch(list(range(0, 20, 2)))
        queue.put((time.perf_counter() - start, sorted(second._prefetched)))

    queue = mp.get_context("fork").Queue()
    process = mp.get_context("fork").Process(target=child, args=(queue,))
    process.start()
    seconds, fetched = queue.get(timeout=60)
    process.join(timeout=60)
    assert fetched == list(range(0, 20, 2))
    assert seconds < 1.0  # 1-3 s while a parent's session was left open or its closer armed


def test_a_failed_prefetch_leaves_the_error_to_the_sample_read(nginx, served, local_shards, fresh_cache):
    from lipkit.data.decode import UndecodableImage

    nginx.put("gone/00000.tar", (local_shards / "00000.tar").read_bytes())
    remote = ShardPairs(resolve_shards(f"{nginx.url}/gone/00000.tar"), "gone")
    (nginx.root / "gone/00000.tar").unlink()  # the shard disappears after it was indexed
    remote.prefetch([0, 1])  # does not raise
    with pytest.raises(UndecodableImage, match=r"FileNotFoundError"):
        remote.image(1)


def test_missing_remote_shard_is_a_clear_error(served, fresh_cache):
    with pytest.raises(LipkitError, match=r"shard not found: http://127\.0\.0\.1:\d+/remote-shards/00003\.tar"):
        open_mixture(f"{served}/{{00000..00007}}.tar")


def test_pipe_shards(local_shards, fresh_cache):
    local = ShardPairs(resolve_shards(str(local_shards / PATTERN)), "local")
    piped = open_mixture(f"pipe:cat {local_shards}/{PATTERN}").sources[0]
    assert_same_samples(local, piped)
    with pytest.raises(LipkitError, match=r"shard command .pipe:cat /nowhere\.tar. failed"):
        open_mixture("pipe:cat /nowhere.tar")


@contextlib.contextmanager
def loopback_server(command: list[str], env: dict[str, str], what: str):
    """Run ``command`` (``{port}`` in it becomes a free port on 127.0.0.1) with ``env`` set in this process
    (``{port}`` there too) until the ``with`` ends; yields the port once the server accepts connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [part.replace("{port}", str(port)) for part in command]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v.replace("{port}", str(port)) for k, v in env.items()})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{what} did not start"
                time.sleep(0.1)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def s3(local_shards):
    """moto's S3 server on 127.0.0.1 holding the shards in bucket ``shards``; yields its endpoint."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "{port}"]
    with loopback_server(command, env, "moto's server") as port:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="shards")
        for path in sorted(local_shards.iterdir()):
            client.upload_file(str(path), "shards", f"laion/{path.name}")
        yield endpoint


def test_s3_shards_are_the_local_samples(s3, local_shards, fresh_cache):
    local = ShardPairs(resolve_shards(str(local_shards / PATTERN)), "local")
    assert_same_samples(local, open_mixture(f"s3://shards/laion/{PATTERN}").sources[0])
    listed = open_mixture("s3://shards/laion/").sources[0]  # a folder: its .tar files, by name
    assert [listed.key(i) for i in range(len(listed))] == [local.key(i) for i in range(len(local))]
    globbed = open_mixture("s3://shards/laion/0000[01].tar").sources[0]
    assert len(globbed) == 16
    batch = [19, 2, 11]
    globbed.prefetch(batch[1:])
    listed.prefetch(batch)
    assert set(listed._prefetched) == set(batch)
    assert [listed.caption(i) for i in batch] == [local.caption(i) for i in batch]


@pytest.fixture(scope="module")
def gcs(local_shards):
    """A Google Cloud Storage emulator (gcp-storage-emulator) on 127.0.0.1 holding the shards in bucket
    ``shards``; gcsfs reaches it through ``STORAGE_EMULATOR_HOST``."""
    pytest.importorskip("gcp_storage_emulator")
    command = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", "{port}",
               "--in-memory", "--default-bucket", "shards"]  # fmt: skip
    # gcsfs's experimental bucket-type probe speaks gRPC, which the emulator does not; anonymous access
    env = {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:{port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    env["NO_GCE_CHECK"] = "true"
    with loopback_server(command, env, "the GCS emulator"):
        gcsfs = pytest.importorskip("gcsfs")  # after STORAGE_EMULATOR_HOST is set: gcsfs reads it on import
        fs = gcsfs.GCSFileSystem(token="anon")
        for path in sorted(local_shards.iterdir()):
            fs.pipe(f"shards/laion/{path.name}", path.read_bytes())
        yield


def test_gcs_shards_are_the_local_samples(gcs, local_shards, fresh_cache):
    local = ShardPairs(resolve_shards(str(local_shards / PATTERN)), "local")
    remote = open_mixture(f"gs://shards/laion/{PATTERN}").sources[0]
    assert_same_samples(local, remote)
    listed = open_mixture("gs://shards/laion/").sources[0]
    assert [listed.key(i) for i in range(len(listed))] == [local.key(i) for i in range(len(local))]
    listed.prefetch([5, 18])
    assert set(listed._prefetched) == {5, 18} and listed.caption(18) == local.caption(18)


@pytest.mark.slow
def test_training_on_http_shards_gives_the_local_batches_and_resumes_exactly(
    served, local_shards, run_overrides, fresh_cache
):
    from lipkit.train import checkpoint as ckpt
    from lipkit.train import loop
    from lipkit.train.config import resolve_config

    base = [*run_overrides, "steps=6", "log_every=1", "checkpoint_every=2", "data.batch_size=4", "data.workers=0"]

    def run(name: str, train: str, *extra: str, callbacks=()):
        cfg = resolve_config("tiny-synthetic", overrides=[*base, f"name={name}", f"data.train={train}", *extra])
        return loop.train(cfg, callbacks=callbacks)

    local = run("local", str(local_shards / PATTERN))
    remote = run("remote", f"{served}/{PATTERN}", "data.workers=2")  # forked workers open their own connections

    def crash(step, _metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run("cut", f"{served}/{PATTERN}", callbacks=[crash])
    assert [p.name for p in ckpt.list_checkpoints(local.run_dir.parent / "cut")] == ["step_00000002.pt"]
    resumed = run("cut", f"{served}/{PATTERN}", "resume=latest")
    weights = [torch.load(r.checkpoint, weights_only=True)["model"] for r in (local, remote, resumed)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]) and torch.equal(weights[0][name], weights[2][name])
