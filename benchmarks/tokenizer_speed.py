"""Throughput of lipkit's ``ClipTokenizer`` against OpenCLIP's ``open_clip.tokenize`` on caption-like text.

Builds ``--n`` synthetic but realistic image captions (deterministic from ``--seed``, no downloads): English
words and phrases in caption templates, with varied lengths, punctuation, numbers, hashtags, a long tail of
rare words and codes, a share of non-ASCII text (curly quotes, accents, dashes, emoji, CJK, Cyrillic), HTML
entities and stray whitespace, and a few captions long enough to be truncated. Both tokenizers start cold (fresh
caches) in the same process and take turns on the same batches of ``--batch-size`` captions, so load from other
processes hits both alike. The script checks that their id tensors are identical and prints texts/s for each
(wall-clock and CPU time; both run on one core) and the speed-up.

Run: ``PYTHONPATH=src python benchmarks/tokenizer_speed.py --n 100000 --batch-size 1024``
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable, Sequence

import torch

_ADJECTIVES = """red blue green yellow black white small large old young happy beautiful modern vintage wooden
rustic bright dark colorful cozy tall tiny fluffy wet sunny snowy empty crowded elegant abstract golden silver fresh
delicious traditional wild quiet busy ancient famous cute funny scary shiny rusty"""
_NOUNS = """dog cat woman man child girl boy baby horse bird car truck bicycle train airplane boat house building
bridge tree flower mountain river lake beach forest street city kitchen bedroom table chair sofa laptop phone camera
guitar book cup plate pizza cake sandwich salad coffee bottle shoe dress jacket shirt hat bag watch painting poster
logo map sign window door garden field road sunset sky cloud ocean wave"""
_SYLLABLES = "ka lo mi ra ton vel or an is bel qu ex dri sha po nu zen ter fa gu"
ADJECTIVES = _ADJECTIVES.split()
NOUNS = _NOUNS.split()
SYLLABLES = _SYLLABLES.split()
ACTIONS = (
    *("sitting on", "standing next to", "running through", "walking along", "lying on", "playing with"),
    *("looking at", "jumping over", "parked in front of", "flying above", "hanging on", "covered in"),
    *("surrounded by", "holding", "eating"),
)
PLACES = (
    *("the park", "a busy street", "the beach at sunset", "a wooden table", "the snow", "a white background"),
    *("the kitchen counter", "New York City", "an old barn", "the living room", "a mountain lake"),
    *("the city center", "a green meadow", "downtown Chicago"),
)
TEMPLATES = (
    "a photo of a {adj} {noun}",
    "{Adj} {noun} {action} {place}",
    "a {adj} {noun} {action} a {noun2} in {place}",
    "Stock Photo - {Adj} {noun} isolated on white",
    "{Noun} {action} {place}, {year}",
    "Men's {Adj} {Noun} - Size {size} | Free Shipping",
    "close-up of a {noun}'s {noun2}",
    "#{noun} #{adj} #{noun2}",
    "{Adj} {Noun} Wallpaper {w}x{h} HD",
    "It's a {adj} day: {noun} and {noun2} {action} {place}!",
    "{Noun} for sale - ${price} (best offer)",
    "DSC_{num}.JPG",
    "The {adj} {noun} {action} {place}. Photo by {Name} via Flickr",
)
NON_ASCII = (
    *("’s", "café", "naïve", "São Paulo", "Zürich", "—", "…", "25°C", "€12.99", "❤️", "😀", "東京", "“quoted”"),
    *("résumé", "Ñandú", "München", "北京", "Москва"),
)
NAMES = ("John Smith", "Maria Garcia", "Li Wei", "Anna Müller", "Jean-Pierre", "O'Brien")


def make_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic synthetic captions."""
    rng = random.Random(seed)
    return [_caption(rng) for _ in range(n)]


def _caption(rng: random.Random) -> str:
    """One caption: 1-3 filled templates, with occasional rare words, non-ASCII, entities, whitespace or length."""
    text = " ".join(_fill(rng.choice(TEMPLATES), rng) for _ in range(rng.choice((1, 1, 1, 2, 2, 3))))
    if rng.random() < 0.3:  # the long tail: rare names, codes and numbers
        text = f"{text} {_rare_word(rng)}"
    roll = rng.random()
    if roll < 0.15:
        words = text.split(" ")
        cut = rng.randrange(len(words) + 1)
        text = " ".join([*words[:cut], rng.choice(NON_ASCII), *words[cut:]])
    elif roll < 0.18:
        text = text.replace(" and ", " &amp; ", 1) if " and " in text else text + " &amp; more"
    elif roll < 0.20:
        text = "  " + text.replace(" ", "\n", 1) + "\t"
    elif roll < 0.22:
        text = " ".join([text] * 8)  # long enough to be truncated
    return text


def _rare_word(rng: random.Random) -> str:
    """A word from the long tail: an invented name, a product code or a number."""
    kind = rng.randrange(3)
    if kind == 0:
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randrange(2, 5))).capitalize()
    if kind == 1:
        return f"{rng.choice(('SKU', 'IMG', 'Model', 'Ref'))}-{rng.randrange(100000)}"
    return f"{rng.randrange(1, 10000)}{rng.choice(('', 'mm', 'cm', 'kg', '%', 'px'))}"


def _fill(template: str, rng: random.Random) -> str:
    """Fill one template with random words."""
    adj, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    return template.format(
        adj=adj,
        Adj=adj.capitalize(),
        noun=noun,
        Noun=noun.capitalize(),
        noun2=rng.choice(NOUNS),
        action=rng.choice(ACTIONS),
        place=rng.choice(PLACES),
        year=rng.randrange(1950, 2025),
        size=rng.choice(("S", "M", "L", "XL")),
        w=rng.choice((1920, 2560, 3840)),
        h=rng.choice((1080, 1440, 2160)),
        price=f"{rng.randrange(5, 500)}.{rng.randrange(100):02d}",
        num=rng.randrange(10000),
        Name=rng.choice(NAMES),
    )


Tokenize = Callable[[list[str]], torch.Tensor]


def race(fns: Sequence[Tokenize], texts: Sequence[str], batch_size: int) -> list[tuple[float, float, torch.Tensor]]:
    """Run the tokenizers in turn on each batch.

    Args:
        fns: The tokenizers.
        texts: All captions.
        batch_size: Captions per call.

    Returns:
        Per tokenizer: wall-clock seconds, CPU seconds and the concatenated ids.
    """
    wall, cpu, outputs = [0.0] * len(fns), [0.0] * len(fns), [[] for _ in fns]
    for i in range(0, len(texts), batch_size):
        batch = list(texts[i : i + batch_size])
        for k, fn in enumerate(fns):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            outputs[k].append(fn(batch))
            wall[k] += time.perf_counter() - start_wall
            cpu[k] += time.process_time() - start_cpu
    return [(wall[k], cpu[k], torch.cat(outputs[k])) for k in range(len(fns))]


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of captions")
    parser.add_argument("--batch-size", type=int, default=1024, help="captions per tokenizer call")
    parser.add_argument("--seed", type=int, default=0, help="seed for the synthetic captions")
    args = parser.parse_args(argv)

    import open_clip

    from lipkit.models.tokenizer import ClipTokenizer

    texts = make_captions(args.n, args.seed)
    non_ascii = sum(not t.isascii() for t in texts) / len(texts)
    entities = sum("&" in t for t in texts) / len(texts)
    print(f"{len(texts):,} captions, batch size {args.batch_size}, {os.cpu_count()} CPUs")
    print(f"non-ASCII captions: {non_ascii:.1%}; with '&': {entities:.1%}")
    start = time.perf_counter()
    tokenizer = ClipTokenizer()
    print(f"lipkit ClipTokenizer construction: {time.perf_counter() - start:.3f} s")

    (ref_wall, ref_cpu, ref), (wall, cpu, ours) = race([open_clip.tokenize, tokenizer], texts, args.batch_size)
    if not torch.equal(ref, ours):
        bad = (ref != ours).any(dim=1).nonzero().flatten().tolist()
        raise SystemExit(f"MISMATCH in {len(bad)} captions, first: {texts[bad[0]]!r}")
    print(f"outputs identical: {tuple(ours.shape)}")
    print(f"{'':22}{'texts/s (wall)':>16}{'texts/s (CPU)':>16}")
    print(f"{'open_clip.tokenize':22}{len(texts) / ref_wall:>16,.0f}{len(texts) / ref_cpu:>16,.0f}")
    print(f"{'lipkit ClipTokenizer':22}{len(texts) / wall:>16,.0f}{len(texts) / cpu:>16,.0f}")
    print(f"{'speed-up':22}{ref_wall / wall:>15.1f}x{ref_cpu / cpu:>15.1f}x")


if __name__ == "__main__":
    main()
