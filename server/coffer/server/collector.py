"""Python's cycle collector, tuned for a serving process.

A batch of a thousand operations makes tens of thousands of container objects (operations,
postings, states, rows) that live until its answers are sent, and nearly all of them are
freed by reference counting, not by the collector. At CPython's default threshold (a young
collection every 700 allocations more than frees) a batch runs young collections over and
over, each promoting the batch's live objects a generation up, where the older collections walk
them again: in `coffer bench --scenario credits` the collector took 12-15 % of the server's CPU
(docs/performance.md, "The cycle collector").

So a serving process, once started, freezes what it has made so far (modules, descriptors,
settings: never garbage, and no longer walked), and collects the young generation every
`young_threshold` allocations: most of a batch's objects are freed before a collection sees
them. Cycles are still collected, later; the memory they can hold meanwhile is bounded by the
threshold (objects of a few hundred bytes: tens of MB at most).
"""

from __future__ import annotations

import gc

__all__ = ["older_threshold", "tune", "young_threshold"]

# Allocations (less frees) of tracked objects between two young collections, and how many
# collections of one generation between two of the next (CPython's defaults: 700, 10, 10).
young_threshold = 50_000
older_threshold = 10


def tune() -> None:
    """For a process that has started serving: freezes its objects and raises the young
    generation's threshold."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(young_threshold, older_threshold, older_threshold)
