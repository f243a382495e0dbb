"""Metadata matching on one core: lipkit's Aho-Corasick ``Matcher`` against MetaCLIP's per-entry scan.

The metadata list has ``--entries`` entries, like MetaCLIP's 500,000: every WordNet lemma (Debian's
``wordnet-base``), the unigrams and bigrams mined from the captions, then two-word entries made from random
pairs of WordNet words until the list is full (below WordNet's size, a random sample of its lemmas). The
captions are the synthetic web-like captions of ``tokenizer_speed.py`` (``--captions``, deterministic).
lipkit's matcher reads every caption; the plain scan, MetaCLIP's loop (``" entry " in text`` for every
padded entry, prepared once), reads only the first ``--plain-captions``, since it is slow. Both normalise
captions the same way, both run in this one process, and their matches must be identical on the captions
both read. The script prints captions/s of each (wall clock and CPU time), the ratio, and lipkit's captions
per minute against the goal of 1,000,000. Matching is single-threaded: on an idle machine both clocks agree,
and where other processes share the cores, CPU time is the work of one core.

Run: ``PYTHONPATH=src python benchmarks/curation_match.py --entries 500000 --captions 200000``
"""

from __future__ import annotations

import argparse
import pickle
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lipkit.data.curation.match import Matcher, padded_entries
from lipkit.data.curation.metadata import mine_ngrams, wordnet_lemmas
from lipkit.data.curation.text import normalise
from results import append_result
from tokenizer_speed import make_captions

GOAL_PER_MINUTE = 1_000_000


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=500_000, help="metadata entries (default: 500,000)")
    p.add_argument("--captions", type=int, default=200_000, help="captions lipkit matches (default: 200,000)")
    p.add_argument("--plain-captions", type=int, default=200, help="captions the plain scan reads (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the captions and synthetic entries")
    p.add_argument("--json", metavar="FILE", help="append the result as one JSON line to FILE")
    return p.parse_args(argv)


def metadata(size: int, captions: Sequence[str], seed: int) -> tuple[list[str], dict[str, int]]:
    """``size`` unique normalised entries, and how many came from each source."""
    rng = random.Random(seed)
    lemmas = wordnet_lemmas()
    if size <= len(lemmas):
        return sorted(rng.sample(lemmas, size)), {"wordnet": size}
    entries = dict.fromkeys(lemmas)
    sources = {"wordnet": len(entries)}
    entries.update(dict.fromkeys(mine_ngrams(captions[:100_000], min_count=5, min_pmi=5.0, min_bigram_count=3)))
    sources["mined"] = len(entries) - sources["wordnet"]
    words = [lemma for lemma in lemmas if " " not in lemma]
    while len(entries) < size:
        entries[f"{rng.choice(words)} {rng.choice(words)}"] = None
    sources["synthetic pairs"] = size - sum(sources.values())
    return list(entries), sources


def timed(fn: Callable[[], list[list[int]]]) -> tuple[list[list[int]], float, float]:
    """``fn()``, its wall-clock seconds and its CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def plain_scan(entries: Sequence[str], captions: Sequence[str]) -> list[list[int]]:
    """MetaCLIP's loop: every padded entry tested against each normalised caption."""
    padded = padded_entries(entries)
    return [[i for i, entry in enumerate(padded) if entry in text] for text in map(normalise, captions)]


def main(argv: Sequence[str] | None = None) -> None:
    """Build the metadata, race the two matchers and print the results."""
    args = parse_args(argv)
    captions = make_captions(args.captions, args.seed)
    entries, sources = metadata(args.entries, captions, args.seed)
    parts = ", ".join(f"{n:,} {source}" for source, n in sources.items())
    print(f"{len(entries):,} entries ({parts}), {len(captions):,} captions")
    start, before = time.perf_counter(), rss_mib()
    matcher = Matcher(entries)
    build_s, matcher_mib = time.perf_counter() - start, rss_mib() - before
    start = time.perf_counter()
    pickled = pickle.dumps(matcher)
    pickle.loads(pickled)
    pickle_s = time.perf_counter() - start
    print(f"lipkit Matcher construction: {build_s:.1f} s, {matcher_mib:,.0f} MiB in memory")
    print(f"pickled (as sent to a worker): {len(pickled) / 2**20:,.0f} MiB, {pickle_s:.1f} s to pickle and unpickle")

    few = captions[: args.plain_captions]
    plain, plain_wall, plain_cpu = timed(lambda: plain_scan(entries, few))
    ours, wall, cpu = timed(lambda: matcher.match_batch(captions))
    if ours[: len(few)] != plain:
        bad = next(i for i, (a, b) in enumerate(zip(ours, plain)) if a != b)
        raise SystemExit(f"MISMATCH on caption {bad}: {few[bad]!r}")
    print(f"matches identical on {len(few):,} captions; {sum(map(len, ours)) / len(ours):.1f} matches per caption")
    rates = {"lipkit": len(captions) / wall, "plain": len(few) / plain_wall}
    cpu_rates = {"lipkit": len(captions) / cpu, "plain": len(few) / plain_cpu}
    report(rates, cpu_rates)
    row = {**vars(args), "entries": len(entries), "sources": sources, "build_s": build_s, "matcher_mib": matcher_mib}
    row |= {"pickle_s": pickle_s, "pickle_mib": len(pickled) / 2**20}
    row |= {"captions_per_s": rates, "captions_per_s_cpu": cpu_rates, "ratio": rates["lipkit"] / rates["plain"]}
    append_result(args.json, "curation_match", row)


def report(rates: dict[str, float], cpu_rates: dict[str, float]) -> None:
    """Print the table, the ratio and lipkit's captions per minute against the goal."""
    print(f"{'':16}{'captions/s (wall)':>20}{'captions/s (CPU)':>20}")
    for name in ("plain", "lipkit"):
        print(f"{name:16}{rates[name]:>20,.1f}{cpu_rates[name]:>20,.1f}")
    ratio, cpu_ratio = rates["lipkit"] / rates["plain"], cpu_rates["lipkit"] / cpu_rates["plain"]
    print(f"ratio lipkit/plain {ratio:,.0f}x (CPU {cpu_ratio:,.0f}x)")
    for clock, rate in (("wall clock", rates["lipkit"]), ("CPU time", cpu_rates["lipkit"])):
        verdict = "met" if 60 * rate >= GOAL_PER_MINUTE else "NOT met"
        print(f"lipkit: {60 * rate:,.0f} captions/min on one core by {clock} (goal {GOAL_PER_MINUTE:,}: {verdict})")


def rss_mib() -> float:
    """This process's resident memory now (Linux), else its peak so far."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
