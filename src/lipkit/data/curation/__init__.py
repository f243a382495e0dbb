"""Data curation: MetaCLIP metadata balancing, deduplication and filtering, as pure functions over row batches.

A row batch is a dict of columns (``key``, ``caption``, and for image stages ``image_bytes`` or embeddings).
Every stage depends only on its batch, its settings and a seed, so the same function runs in a local process
pool or in Ray Data's ``map_batches`` and the kept keys do not depend on order, worker count or machine count.

Modules: :mod:`.text` (caption normalisation), :mod:`.metadata` (WordNet, mined n-grams, user lists),
:mod:`.match` (Aho-Corasick substring matching), :mod:`.balance` (per-entry counts and sampling).
"""

from __future__ import annotations

from lipkit.errors import LipkitError


class CurationError(LipkitError):
    """Curation cannot run as asked: an empty metadata list, an unreadable list or shard, a bad setting."""
