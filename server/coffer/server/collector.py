"""Python's cycle collector, tuned for a serving process.

A batch of a thousand operations makes tens of thousands of container objects (operations,
postings, states, rows), nearly all freed by their reference counts once the batch is
answered. At CPython's default thresholds (a young collection every 700 allocations more than
frees) a batch runs young collections over and over, each promoting what the batch still holds
a generation up, where the older collections walk it again: in `coffer bench --scenario
credits` the collector took 12-15 % of the server's CPU (docs/performance.md, the fourth
sitting).

So a serving process, before it starts serving, freezes what it has made so far (modules,
descriptors, settings: never garbage; `gc.freeze`, whose objects no collection walks again),
and collects its young generation every `threshold_young` allocations more than frees: a
batch's objects are freed before a collection sees them. Cycles are still collected, later
(the older generations after `threshold_older` collections of the one below, as by default,
so much less often than by default): in the bench the largest process grew by about 2 MB,
well within its budget (`coffer bench` reports it).
"""

from __future__ import annotations

import gc

__all__ = ["threshold_older", "threshold_young", "tune"]

# Allocations (less frees) of tracked objects between two young collections; and, for each
# older generation (the middle and the oldest), collections of the one below between two of
# its own (CPython's defaults: 700, 10, 10).
threshold_young = 50_000
threshold_older = 10


def tune() -> None:
    """For a process about to serve, once its modules are imported: freezes its objects and
    raises the young generation's threshold."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(threshold_young, threshold_older, threshold_older)
