"""Where a rank's training data stream stands, so that a resumed run continues it exactly.

Why this shape: every (rank, worker) stream is cut into blocks (`pipeline.SampleSource.train_samples`); a block's
shard draws, shuffle and per-sample augmentation seeds derive only from (seed, rank, worker, block, position),
so a stream's whole future is fixed by a `Cursor` = (block, position of the next raw sample in that block's
shuffled order). Workers attach their cursors to every batch; `LoaderState` keeps the cursors of the batches the
trainer has consumed (not those prefetched), and the count of consumed batches, which fixes where DataLoader's
round-robin over workers stands: after `batches` batches the next one comes from logical worker
`batches % slots`. A resumed loader therefore gives its physical worker p the role of logical worker
`(p + batches) % slots` and starts each stream at its saved cursor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Cursor:
    """Position in one sample stream: `block`, and `position` = raw samples of that block's shuffled order
    already taken (those before it are read again on resume but never decoded)."""

    block: int = 0
    position: int = 0

    def as_list(self) -> list[int]:
        return [self.block, self.position]


def stream_slots(num_workers: int) -> int:
    """Logical worker streams per rank: 0 workers (the main process) is one stream, like 1 worker."""
    return max(num_workers, 1)


@dataclass
class LoaderState:
    """One rank's train stream position: what the checkpoint stores (`to_dict`) and what a loader resumes from.

    cursors[w][i]: logical worker w, source i (one source unless data.sources); missing = the stream's start.
    reseed: folded into every stream seed; 0 normally, the resume step for a checkpoint written before exact
    resume existed (its streams restart, re-seeded, instead of replaying the samples of the first steps).
    """

    world_size: int
    num_workers: int
    batches: int = 0
    cursors: dict[int, list[list[int]]] = field(default_factory=dict)
    reseed: int = 0

    @property
    def slots(self) -> int:
        return stream_slots(self.num_workers)

    def logical_worker(self, physical: int) -> int:
        """The stream a loader's worker `physical` continues: DataLoader restarts its rotation at worker 0."""
        return (physical + self.batches) % self.slots

    def cursor(self, worker: int, source: int = 0) -> Cursor:
        saved = self.cursors.get(worker)
        return Cursor(*saved[source]) if saved is not None else Cursor()

    def record(self, stamp: dict[str, Any]) -> None:
        """A batch the trainer took: its worker's cursors (after the batch's last sample) become the resume point."""
        self.cursors[int(stamp["worker"])] = [list(c) for c in stamp["cursors"]]
        self.batches += 1

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "num_workers": self.num_workers, "batches": self.batches,
                "cursors": {str(w): c for w, c in self.cursors.items()}, "reseed": self.reseed}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LoaderState:
        return cls(world_size=int(saved["world_size"]), num_workers=int(saved["num_workers"]),
                   batches=int(saved["batches"]), reseed=int(saved.get("reseed", 0)),
                   cursors={int(w): [list(map(int, c)) for c in cs] for w, cs in saved["cursors"].items()})


def stamp(worker: int, cursors: list[Cursor]) -> dict[str, Any]:
    """What a worker attaches to a batch (key "stream" of the batch dict): plain ints, picklable and pinnable."""
    return {"worker": worker, "cursors": [c.as_list() for c in cursors]}


def resume_problem(saved_world: int, saved_workers: int | None, world_size: int, num_workers: int,
                   checkpoint: str = "<the checkpoint>") -> str | None:
    """Why a checkpoint's streams cannot be continued by this launch (None: they can); saved_workers None: the
    world size alone is checked.

    Each (rank, worker) stream is its own sequence; a different count of them has no exact continuation, and a
    silent re-split would make "resumed" runs differ from uninterrupted ones without anyone noticing.
    """
    fix = (f"start a new run dir from its weights only with model.init.checkpoint={checkpoint} "
           "(fresh data streams and optimizer state)")
    if int(saved_world) != world_size:
        return (f"the checkpoint was written by {saved_world} ranks but this launch has {world_size}; its data "
                f"streams continue exactly only on {saved_world} ranks: relaunch with {saved_world} ranks, or {fix}")
    if saved_workers is not None and stream_slots(saved_workers) != stream_slots(num_workers):
        return (f"the checkpoint's data streams come from data.num_workers={saved_workers} per rank but this "
                f"launch has data.num_workers={num_workers}; set data.num_workers={saved_workers}, or {fix}")
    return None
