from __future__ import annotations

import io
import math
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lipkit.cli.main import main
from lipkit.data.corpora import render_emoji, tuxpaint_captions, tuxpaint_stamps
from lipkit.data.curation import CurationError
from lipkit.data.curation.balance import count_matches, entry_probability, keep_mask
from lipkit.data.curation.curate import CurateConfig, curate
from lipkit.data.curation.match import Matcher
from lipkit.data.curation.runner import LocalRunner
from lipkit.data.spec import open_mixture
from lipkit.errors import LipkitError

EMOJI = (0x1F436, 0x1F431, 0x1F697, 0x1F333, 0x1F3E0, 0x2B50, 0x1F34E, 0x1F6B2, 0x1F41F, 0x1F680)
ENTRIES = ["a", "letter", "the", "frog", "face", "car", "of", "sign", "an", "tree", "cat", "dog", "moon", "orange"]
# settings that let every test image through the filters, so that only dedup and balancing drop pairs
OPEN_FILTERS = ["--min-words", "0", "--min-chars", "0", "--min-side", "0", "--max-aspect", "0"]


def reencoded(data: bytes, scale: float) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGBA")
    flat = Image.new("RGB", image.size, "white")
    flat.paste(image, mask=image.getchannel("A"))
    buf = io.BytesIO()
    flat.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS).save(buf, "JPEG")
    return buf.getvalue()


def write_corpus(folder: Path) -> dict[str, str]:
    """20 Tux Paint stamps and 10 emoji with captions, planted duplicates, one broken image and one
    Windows-1252 caption. Returns the planted duplicates: dropped key -> kept key."""
    folder.mkdir(parents=True)
    stamps = [p for p in tuxpaint_stamps() if "en" in tuxpaint_captions(p.with_suffix(".txt"))[0]][::40][:20]
    for p in stamps:
        shutil.copyfile(p, folder / f"tux_{p.stem}.png")
        (folder / f"tux_{p.stem}.txt").write_text(tuxpaint_captions(p.with_suffix(".txt"))[0]["en"])
    for cp in EMOJI:
        render_emoji(chr(cp)).save(folder / f"emoji_{cp:05x}.png")
        (folder / f"emoji_{cp:05x}.txt").write_text(unicodedata.name(chr(cp)).lower())
    shutil.copyfile(folder / "tux_frog-1.png", folder / "copy_frog.png")
    (folder / "copy_frog.txt").write_text("the same frog again")
    shutil.copyfile(folder / "tux_whale.png", folder / "tux_whale_copy.png")
    (folder / "tux_whale_copy.txt").write_text("a whale twice")
    (folder / "tux_horse_small.jpg").write_bytes(reencoded((folder / "tux_horse.png").read_bytes(), 0.75))
    (folder / "tux_horse_small.txt").write_text("a smaller horse")
    (folder / "emoji_1f436_big.jpg").write_bytes(reencoded((folder / "emoji_1f436.png").read_bytes(), 1.25))
    (folder / "emoji_1f436_big.txt").write_text("a bigger dog face")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    (folder / "broken.txt").write_text("a broken image")
    Image.new("RGB", (40, 30), (200, 120, 40)).save(folder / "cafe.png")
    (folder / "cafe.txt").write_bytes("café crème orange".encode("cp1252"))
    return {
        "tux_frog-1.png": "copy_frog.png",
        "tux_whale_copy.png": "tux_whale.png",
        "tux_horse_small.jpg": "tux_horse.png",
        "emoji_1f436_big.jpg": "emoji_1f436.png",
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    root = tmp_path_factory.mktemp("curate")
    planted = write_corpus(root / "pairs")
    entries = root / "entries.txt"
    entries.write_text("\n".join(ENTRIES) + "\n")
    return root / "pairs", planted, entries


def config(corpus, out: Path, **changes) -> CurateConfig:
    folder, _, entries = corpus
    settings = dict(
        metadata=(str(entries),), min_words=0, min_chars=0, min_side=0, max_aspect=0, balance=2.0, seed=3, batch_size=7
    )
    return CurateConfig(str(folder), str(out), **{**settings, **changes})


def expected_balance(keys: list[str], captions: list[str], seed: int, t: float) -> list[str]:
    """The reference: MetaCLIP's sampling over the given pairs, by the balance module's functions."""
    matches = Matcher(ENTRIES).match_batch(captions)
    probs = entry_probability(count_matches(matches, len(ENTRIES)), t)
    return [k for k, keep in zip(keys, keep_mask(keys, matches, probs, seed)) if keep]


def test_cli_writes_keys_provenance_card_and_shards(corpus, tmp_path, capsys):
    folder, planted, entries = corpus
    out = tmp_path / "curated"
    argv = ["data", "curate", str(folder), "--out-dir", str(out), "--metadata", str(entries), *OPEN_FILTERS]
    argv += ["--balance", "2", "--seed", "3", "--write", "shards", "--samples-per-shard", "10", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    prov = pq.read_table(out / "provenance.parquet").to_pydict()
    rows = {k: i for i, k in enumerate(prov["key"])}
    assert len(rows) == 36
    # the planted duplicates, and only they, are dropped by dedup, mapped to the smallest key of their group
    dups = {k: prov["duplicate_of"][i] for k, i in rows.items() if prov["stage"][i] in ("exact_dup", "near_dup")}
    assert dups == planted
    broken = rows["broken.png"]
    assert prov["stage"][broken] == "unreadable" and "undecodable_image" in prov["reason"][broken]
    cafe = rows["cafe.png"]
    assert prov["caption"][cafe] == "café crème orange" and prov["caption_fallback"][cafe] is True
    assert "1 captions were not UTF-8" in printed
    # balancing drops exactly what MetaCLIP's sampling drops among the rest
    rest = [k for k, i in rows.items() if prov["stage"][i] in ("kept", "balance")]
    kept = expected_balance(rest, [prov["caption"][rows[k]] for k in rest], seed=3, t=2.0)
    assert 0 < len(kept) < len(rest)
    assert (out / "keys.txt").read_text().split() == kept
    assert [k for k in prov["key"] if prov["stage"][rows[k]] == "kept"] == kept
    assert prov["entries"][rows["tux_frog-1.png"]] == ["a", "frog"]
    # the card shows the stages and thumbnails; curation.json holds the settings
    card = (out / "card.html").read_text()
    assert "near_dup" in card and "exact_dup" in card and card.count('src="data:image/png;base64,') >= 10
    assert '"balance": 2.0' in (out / "curation.json").read_text()
    # the shards hold the kept pairs, and `lipkit data info` reads them
    assert main(["data", "info", str(out / "shards"), "--show", "0"]) == 0
    assert f": {len(kept)} pairs, {math.ceil(len(kept) / 10)} shards" in capsys.readouterr().out
    shards = open_mixture(str(out / "shards")).as_source()
    captions = {k: prov["caption"][rows[k]] for k in kept}
    assert [shards.caption(i) for i in range(len(shards))] == [captions[k] for k in kept]
    # the key list as a filter of the original spec gives exactly the kept pairs
    subset = open_mixture([{"source": str(folder), "keys": str(out / "keys.txt")}]).as_source()
    assert [subset.key(i) for i in range(len(subset))] == kept
    assert [subset.caption(i) for i in range(len(subset))] == [captions[k] for k in kept]


def test_key_list_keeps_shard_boundaries(corpus, tmp_path):
    from lipkit.data.pack import PackOptions, file_items, pack

    folder, _, _ = corpus
    pack(file_items(folder), tmp_path / "shards", PackOptions(samples_per_shard=8), progress=False)
    shards = open_mixture(str(tmp_path / "shards")).as_source()
    assert shards.groups().tolist() == [0, 7, 15, 23, 31, 35]  # the broken image is missing from the first
    picked = [1, 2, 3, 20, 21, 34]  # 3 from the first shard, none from the second, 2 from the third...
    (tmp_path / "keys.txt").write_text("".join(f"{shards.key(i)}\n" for i in picked) + "not-a-key\n")
    subset = open_mixture([{"source": str(tmp_path / "shards"), "keys": str(tmp_path / "keys.txt")}]).as_source()
    assert [subset.key(i) for i in range(len(subset))] == [shards.key(i) for i in picked]
    assert subset.groups().tolist() == [0, 3, 3, 5, 5, 6]
    (tmp_path / "none.txt").write_text("nothing\n")
    with pytest.raises(LipkitError, match="names none of the pairs"):
        open_mixture([{"source": str(tmp_path / "shards"), "keys": str(tmp_path / "none.txt")}])


def test_same_keys_with_1_2_and_3_processes(corpus, tmp_path):
    found = []
    for workers in (1, 2, 3):
        with LocalRunner(workers) as runner:
            curate(config(corpus, tmp_path / f"w{workers}", dedup=("exact", "near", "caption")), runner)
        found.append((tmp_path / f"w{workers}" / "keys.txt").read_text())
    assert found[0] == found[1] == found[2] and len(found[0].split()) > 5
    curate(config(corpus, tmp_path / "other-seed", dedup=("exact", "near", "caption"), seed=4))
    assert (tmp_path / "other-seed" / "keys.txt").read_text() != found[0]


def test_filters_in_the_pipeline_drop_by_their_own_predicate(corpus, tmp_path):
    result = curate(config(corpus, tmp_path / "f", min_words=3, min_side=100, balance=None, metadata=()))
    prov = pq.read_table(tmp_path / "f" / "provenance.parquet").to_pydict()
    for key, stage, caption, w, h in zip(prov["key"], prov["stage"], prov["caption"], prov["width"], prov["height"]):
        if stage in ("unreadable", "exact_dup", "near_dup"):
            continue
        expected = "caption" if len(caption.split()) < 3 else "image_size" if min(w, h) < 100 else "kept"
        assert stage == expected, key
    assert result.kept == sum(s == "kept" for s in prov["stage"]) and result.dropped["caption"] > 0


def write_embeddings(folder: Path, keys: list[str], image: np.ndarray, text: np.ndarray) -> None:
    from lipkit.data.embeddings import FORMAT, VERSION, ModelRecord, PartInfo, write_manifest, write_part

    folder.mkdir()
    write_part(folder, "part-00000", {"image": image, "text": text}, {"key": keys}, PartInfo(len(keys), "test"))
    record = ModelRecord("0" * 64, image.shape[1], "tiny")
    manifest = {"format": FORMAT, "version": VERSION, "model": record.to_dict(), "modalities": ["image", "text"]}
    write_manifest(folder, {**manifest, "data": "test", "parts": {"part-00000": {"rows": len(keys), "input": "test"}}})


def test_scores_and_semantic_dedup_from_an_embeddings_folder(corpus, tmp_path):
    folder, _, _ = corpus
    keys = sorted(p.name for p in folder.iterdir() if p.suffix != ".txt")
    rng = np.random.default_rng(0)
    image = np.linalg.qr(rng.normal(size=(64, 64)))[0][: len(keys)].astype(np.float32)  # orthonormal: no duplicates
    scores = rng.uniform(-0.2, 0.9, len(keys))
    other = np.linalg.qr(rng.normal(size=(64, 64)))[0][-len(keys) :]
    other -= (other * image).sum(1, keepdims=True) * image  # orthogonal to its own image vector
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    text = (scores[:, None] * image + np.sqrt(1 - scores[:, None] ** 2) * other).astype(np.float32)
    write_embeddings(tmp_path / "emb", keys[:-1], image[:-1], text[:-1])  # the last key has no vectors
    out = tmp_path / "scored"
    cfg = config(corpus, out, embeddings=str(tmp_path / "emb"), top_fraction=0.3, dedup=(), balance=None)
    result = curate(cfg)
    prov = pq.read_table(out / "provenance.parquet").to_pydict()
    stage = dict(zip(prov["key"], prov["stage"]))
    assert stage[keys[-1]] == "no_embedding" and result.dropped["no_embedding"] == 1
    reaching = [k for k in keys[:-1] if stage[k] != "unreadable"]
    passed = [k for k in reaching if stage[k] != "score"]
    assert len(passed) == math.ceil(0.3 * len(reaching))
    best = sorted(reaching, key=lambda k: -scores[keys.index(k)])[: len(passed)]
    assert sorted(passed) == sorted(best)
    got = dict(zip(prov["key"], prov["score"]))
    assert all(abs(got[k] - scores[keys.index(k)]) < 1e-5 for k in reaching)


def test_semantic_dedup_drops_the_planted_twin(corpus, tmp_path):
    folder, _, _ = corpus
    keys = sorted(p.name for p in folder.iterdir() if p.suffix != ".txt")
    image = np.linalg.qr(np.random.default_rng(1).normal(size=(64, 64)))[0][: len(keys)].astype(np.float32)
    image[keys.index("tux_orange_seville.png")] = image[keys.index("tux_moon_crescent.png")]
    write_embeddings(tmp_path / "emb", keys, image, image)
    curate(config(corpus, tmp_path / "sem", embeddings=str(tmp_path / "emb"), dedup=("semantic",), balance=None))
    prov = pq.read_table(tmp_path / "sem" / "provenance.parquet").to_pydict()
    dropped = {k: d for k, s, d in zip(prov["key"], prov["stage"], prov["duplicate_of"]) if s == "semantic_dup"}
    assert dropped == {"tux_orange_seville.png": "tux_moon_crescent.png"}


def test_bad_inputs_give_one_clear_line(corpus, tmp_path, capsys):
    folder, _, _ = corpus
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["data", "curate", str(folder), "--out-dir", str(tmp_path / "a"), "--metadata", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert "metadata" in err and "empty" in err and len(err.splitlines()) == 1
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(b"\x1f\x8b\x08 this is gzip, not a tar")
    bad = str(tmp_path / "shards" / "00000.tar")
    assert main(["data", "curate", bad, "--out-dir", str(tmp_path / "b"), "--metadata", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert "00000.tar" in err and len(err.splitlines()) == 1
    assert main(["data", "curate", str(folder), "--out-dir", str(tmp_path / "c"), "--top-fraction", "0.3"]) == 2
    assert "--embeddings" in capsys.readouterr().err
    assert main(["data", "curate", str(folder), "--out-dir", str(tmp_path / "r"), "--ray", "127.0.0.1:1"]) == 2
    assert "cannot reach a Ray cluster at '127.0.0.1:1'" in capsys.readouterr().err
    with pytest.raises(CurationError, match="weights are for training"):
        curate(CurateConfig(f"{folder}::0.5,{folder}::0.5", str(tmp_path / "d"), metadata=()))


def test_a_filter_that_drops_most_samples_is_pointed_out(corpus, tmp_path, capsys):
    folder, _, _ = corpus
    # DataComp's 200 px floor against stamps and emoji of at most 72-150 px: nearly all go at image_size
    assert main(["data", "curate", str(folder), "--out-dir", str(tmp_path / "a"), "--metadata", "none", "-q"]) == 0
    out = capsys.readouterr().out
    counts = dict(part.rsplit(" ", 1) for part in out.splitlines()[0].split("dropped: ")[1].split(", "))
    reached = 36 - int(counts["unreadable"]) - int(counts["caption"])  # the broken image; short captions
    assert int(counts["image_size"]) >= reached / 2
    assert (
        f"note: the image_size filter (--min-side 200) dropped {counts['image_size']} of the {reached} samples that "
        "reached it; where the images are small (icons, resized shards), lower it (0 turns it off)"
    ) in out
    assert "the caption filter" not in out and "the aspect filter" not in out
    args = ["data", "curate", str(folder), "--out-dir", str(tmp_path / "b"), "--metadata", "none", "-q", *OPEN_FILTERS]
    assert main(args) == 0
    assert "note:" not in capsys.readouterr().out
