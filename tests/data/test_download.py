"""``lipkit data download`` against a real nginx on 127.0.0.1 serving real images and every fault kind."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from lipkit.cli.main import main
from lipkit.data.download import DownloadOptions, UrlRow, download, opted_out, read_url_table, status_table
from lipkit.errors import LipkitError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

STAMPS = Path("/usr/share/tuxpaint/stamps")


def real_images(n: int) -> list[tuple[str, bytes, str]]:
    """``n`` Tux Paint stamps (name, PNG bytes, caption from the stamp's name), every other one as a JPEG."""
    out = []
    for path in sorted(STAMPS.rglob("*.png"))[: 4 * n : 4]:
        data = path.read_bytes()
        if len(out) % 2:
            buf = io.BytesIO()
            Image.open(path).convert("RGB").save(buf, "JPEG", quality=90)
            data, name = buf.getvalue(), f"{path.stem}.jpg"
        else:
            name = path.name
        out.append((name, data, f"a drawing of a {path.stem.replace('_', ' ')}"))
    assert len(out) == n
    return out


def huge_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid PNG declaring width x height 1-bit pixels, all zero (a few hundred KB, 400 megapixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(row * height, 9))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def served(nginx, request):
    """Real images and every fault, served under a folder of this test's own; the rows of the table."""
    prefix = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]
    rows: list[UrlRow] = []
    for name, data, caption in real_images(10):
        rows.append(UrlRow(nginx.put(f"{prefix}/img/{name}", data), caption, {"license": "GPL"}))
    jpeg = Image.open(io.BytesIO(nginx_bytes(nginx, rows[1].url)))
    buf = io.BytesIO()
    jpeg.save(buf, "JPEG")
    faults = {
        "http_404": f"{nginx.url}/{prefix}/missing.jpg",
        "http_500": f"{nginx.url}/fault/500/{prefix}/error.jpg",
        "timeout": nginx.put(f"slow/{prefix}/slow.jpg", buf.getvalue() + b"\0" * 40_000),
        "truncated": nginx.put(f"{prefix}/cut.jpg", buf.getvalue()[: len(buf.getvalue()) // 2]),
        "not_an_image": nginx.put(f"{prefix}/page.jpg", b"<html><body>Not found, but 200 OK</body></html>"),
        "decompression_bomb": nginx.put(f"{prefix}/bomb.png", huge_png()),
        "opted_out": nginx.put(f"optout/{prefix}/mine.jpg", buf.getvalue()),
        "connection_error": "http://127.0.0.1:9/refused.jpg",
        "bad_url": "ftp://example.org/a.jpg",
    }
    rows += [UrlRow(url, f"fault {kind}") for kind, url in faults.items()]
    rows.append(UrlRow(nginx.put(f"optout-other/{prefix}/theirs.jpg", buf.getvalue()), "opted out for another bot"))
    rows.append(UrlRow(nginx.put(f"{prefix}/nocaption.jpg", buf.getvalue()), None))
    rows.insert(7, UrlRow(rows[0].url, "the first image again"))  # a duplicate URL in the same shard: fetched once
    return prefix, rows


def nginx_bytes(nginx, url: str) -> bytes:
    return (nginx.root / url.removeprefix(f"{nginx.url}/")).read_bytes()


FAST = {"timeout": 1.5, "retries": 1, "backoff": 0.05, "threads": 8}


def test_every_fault_is_counted_under_its_own_kind(nginx, served, tmp_path):
    prefix, rows = served
    result = download(rows, tmp_path / "out", DownloadOptions(samples_per_shard=8, **FAST), progress=False)
    expected_failures = {
        "bad_url": 1, "connection_error": 1, "decompression_bomb": 1, "http_404": 1, "http_500": 1,
        "missing_caption": 1, "not_an_image": 1, "opted_out": 1, "timeout": 1, "truncated": 1,
    }  # fmt: skip
    assert result.failures == expected_failures
    assert result.count == len(rows) == 22 and result.successes == 12 and result.shards == 3
    table = status_table(tmp_path / "out").to_pylist()
    assert [r["url"] for r in table] == [r.url for r in rows]  # one row per URL, in table order
    by_url = {r["caption"]: r for r in table}
    assert by_url["fault http_404"]["http_status"] == 404 and by_url["fault http_500"]["http_status"] == 500
    assert "X-Robots-Tag: noai, noimageai" in by_url["fault opted_out"]["error"]
    assert by_url["opted out for another bot"]["status"] == "success"
    # retried once after the 500 (transient); the 404 is not retried; the duplicate URL was fetched once
    assert nginx.requests(f"fault/500/{prefix}/error.jpg") == 2 and nginx.requests(f"{prefix}/missing.jpg") == 1
    assert nginx.requests(rows[0].url.removeprefix(f"{nginx.url}/")) == 1
    # the samples: img2dataset's keys, image bytes as served, caption and metadata
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000001.json").read())
        jpeg = tar.extractfile("000001.jpg").read()
    assert names[:3] == ["000000.jpg", "000000.txt", "000000.json"]  # keys: shard, then position (one digit of 8)
    assert jpeg == nginx_bytes(nginx, rows[1].url)  # a JPEG that needs no resizing is kept byte for byte
    assert meta["url"] == rows[1].url and meta["caption"] == rows[1].caption and meta["license"] == "GPL"
    stats = json.loads((tmp_path / "out" / "00000_stats.json").read_text())
    assert stats["count"] == 8 and stats["successes"] == 8 and stats["failures"] == {}
    assert not (tmp_path / "out" / ".fetched").exists()


def test_resume_skips_finished_shards_and_fetched_urls(nginx, served, tmp_path):
    _, rows = served
    good = [r for r in rows[:11] if r.caption != "the first image again"]
    out = tmp_path / "out"
    options = DownloadOptions(samples_per_shard=4, **FAST)
    download(good, out, options, progress=False)
    first = {p.name: p.read_bytes() for p in out.glob("0000*") if not p.name.endswith("_stats.json")}
    # a run cut short: shard 1 lost, its spool of fetched URLs kept
    for name in ("00001.tar", "00001.parquet", "00001_stats.json"):
        (out / name).unlink()
    import lipkit.data.download as dl

    spool = dl._Spool(out, 1)
    for row in good[4:8]:
        spool.put(row.url, ("success", nginx_bytes(nginx, row.url), 200, ""))
    spool.file.write(b"\x01" * 40)  # a record torn by the kill: ignored
    spool.file.close()
    before = {row.url: nginx.requests(row.url.removeprefix(f"{nginx.url}/")) for row in good}
    result = download(good, out, options, progress=False)
    assert result.written == 1 and result.successes == 10
    after = {row.url: nginx.requests(row.url.removeprefix(f"{nginx.url}/")) for row in good}
    assert after == before  # nothing fetched again: shards 0 and 2 were finished, shard 1's URLs spooled
    again = {p.name: p.read_bytes() for p in out.glob("0000*") if not p.name.endswith("_stats.json")}
    assert again == first  # the same shards and status tables as the first run
    with pytest.raises(LipkitError, match="another table or with other settings"):
        download(good, out, DownloadOptions(samples_per_shard=4, max_side=64, **FAST), progress=False)


def test_shards_are_the_same_with_processes_and_resized(served, tmp_path):
    _, rows = served
    one = download(rows[:11], tmp_path / "one", DownloadOptions(samples_per_shard=3, max_side=48, **FAST), False)
    two = download(
        rows[:11], tmp_path / "two", DownloadOptions(samples_per_shard=3, max_side=48, processes=2, **FAST), False
    )
    assert one.successes == two.successes == 11
    for name in ("00000.tar", "00001.tar", "00002.tar", "00003.tar", "00002.parquet"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    with tarfile.open(tmp_path / "one" / "00000.tar") as tar:
        sizes = [Image.open(tar.extractfile(n)).size for n in tar.getnames() if n.endswith(".jpg")]
    assert sizes and all(max(s) <= 48 for s in sizes)


@pytest.mark.xdist_group("ray")  # one worker, one Ray instance (ray_local), under `pytest -n 2 --dist loadgroup`
def test_ray_writes_the_same_shards(served, tmp_path, ray_local):
    _, rows = served
    options = DownloadOptions(samples_per_shard=5, **FAST)
    download(rows[:10], tmp_path / "local", options, progress=False)
    result = download(rows[:10], tmp_path / "ray", options, progress=False, ray_address="local")
    assert result.written == 2 and result.successes == 10 and result.failures == {}
    for name in ("00000.tar", "00001.tar", "00000.parquet", "00001.parquet"):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()


def test_url_tables_of_laion_datacomp_and_cc3m(tmp_path):
    laion = tmp_path / "laion.parquet"
    pq.write_table(
        pa.table({"URL": ["http://a/1.jpg"], "TEXT": ["a cat"], "WIDTH": [640], "similarity": [0.31]}), laion
    )
    [row] = read_url_table(laion)
    assert (row.url, row.caption, row.meta) == ("http://a/1.jpg", "a cat", {"WIDTH": 640, "similarity": 0.31})
    datacomp = tmp_path / "datacomp.csv"
    datacomp.write_text("uid,url,text\n7,http://b/2.png,a dog\n")
    assert read_url_table(datacomp)[0] == UrlRow("http://b/2.png", "a dog", {"uid": "7"})
    cc3m = tmp_path / "cc3m.tsv"  # no header: caption, then URL
    cc3m.write_text("a bird on a wire\thttp://c/3.jpg\nsunset\thttp://c/4.jpg\n")
    assert [(r.url, r.caption) for r in read_url_table(cc3m)] == [
        ("http://c/3.jpg", "a bird on a wire"),
        ("http://c/4.jpg", "sunset"),
    ]
    named = tmp_path / "named.csv"
    named.write_text("link_to_image,alt_text\nhttp://d/5.jpg,a fish\n")
    with pytest.raises(LipkitError, match=r"has no url column .* its columns are: link_to_image, alt_text"):
        read_url_table(named)
    assert read_url_table(named, url_col="link_to_image", caption_col="alt_text")[0].caption == "a fish"


def test_opt_out_directives():
    assert opted_out(["noai"]) and opted_out(["noindex, nofollow"]) and opted_out(["lipkit: noimageai"])
    assert not opted_out(["otherbot: noai"]) and not opted_out(["nofollow"]) and not opted_out([])
    assert opted_out(["otherbot: noai", "NoImageAI"])


def test_command_line_reports_and_resumes(served, tmp_path, capsys):
    _, rows = served
    table = tmp_path / "urls.parquet"
    picked = rows[:13]  # ten images, one of them twice, and the 404 and the 500
    pq.write_table(pa.table({"url": [r.url for r in picked], "caption": [r.caption for r in picked]}), table)
    args = ["data", "download", str(table), "--out-dir", str(tmp_path / "out"), "--samples-per-shard", "6",
            "--timeout", "1.5", "--retries", "0", "--processes", "1", "-q"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "11 of 13 URLs in 3 shards" in out and "(3 written, 0 already done)" in out
    assert "failed: http_404 1, http_500 1" in out
    assert main(args) == 0
    assert "(0 written, 3 already done)" in capsys.readouterr().out
    assert main(["data", "download", str(tmp_path / "none.csv"), "--out-dir", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
