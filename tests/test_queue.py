"""FeatureQueue: size validation, ring-buffer writes, state-dict round trip, 2-process gathered enqueue."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mmpt.objectives.queue import FeatureQueue, validate_queue_size
from tests.dist_helpers import run_ranks

WORLD, LOCAL_BATCH, DIM, SIZE = 2, 2, 3, 12  # global batch 4: the third enqueue ends at the end, the fourth wraps


def test_validate_queue_size_message() -> None:
    validate_queue_size(65536, 512)
    with pytest.raises(ValueError, match=r"queue size 1000 .* multiple of the global batch 384.*768, 1152"):
        validate_queue_size(1000, 384)
    with pytest.raises(ValueError, match=r"nearest valid sizes: 8$"):
        validate_queue_size(5, 8)
    with pytest.raises(ValueError, match="positive"):
        validate_queue_size(8, 0)


def test_init_is_normalised_and_buffers_are_in_state_dict() -> None:
    torch.manual_seed(0)
    queue = FeatureQueue(DIM, SIZE)
    torch.testing.assert_close(queue.feats.norm(dim=1), torch.ones(SIZE))
    assert set(queue.state_dict()) == {"feats", "ptr"}
    assert not list(queue.parameters())
    with pytest.raises(ValueError, match="multiple of the global batch 5"):
        queue.enqueue(torch.zeros(5, DIM))


def test_single_process_ring_buffer_and_state_dict_round_trip() -> None:
    queue = FeatureQueue(DIM, 6)
    batches = [torch.full((3, DIM), float(k)) + torch.arange(3.0)[:, None] / 10 for k in range(3)]
    queue.enqueue(batches[0])
    queue.enqueue(batches[1])
    assert queue.ptr.tolist() == [0]
    torch.testing.assert_close(queue.feats, torch.cat(batches[:2]))
    queue.enqueue(batches[2])  # overwrites the oldest batch
    torch.testing.assert_close(queue.feats, torch.cat([batches[2], batches[1]]))
    assert queue.ptr.tolist() == [3]

    restored = FeatureQueue(DIM, 6)
    restored.load_state_dict(queue.state_dict())
    torch.testing.assert_close(restored.feats, queue.feats)
    assert restored.ptr.tolist() == [3]
    snapshot = queue()  # a copy: later enqueues must not change it
    queue.enqueue(batches[0])
    torch.testing.assert_close(snapshot, torch.cat([batches[2], batches[1]]))


def _local_batch(step: int, rank: int) -> torch.Tensor:
    """Value encodes (step, rank, row) so the expected order can be written down exactly."""
    rows = torch.arange(LOCAL_BATCH, dtype=torch.float32)
    return (100.0 * step + 10.0 * rank + rows)[:, None].expand(LOCAL_BATCH, DIM).contiguous()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # identical random init on every rank, as the trainer guarantees
        queue = FeatureQueue(DIM, SIZE)
        initial = queue.feats.clone()
        ptrs = []
        for step in range(4):
            queue.enqueue(_local_batch(step, rank))
            ptrs.append(int(queue.ptr))
        torch.save({"feats": queue.feats, "ptrs": ptrs, "initial": initial}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_enqueue_is_rank_major_and_identical(tmp_path: Path) -> None:
    ranks = run_ranks(_worker, tmp_path, WORLD)

    def global_batch(step: int) -> torch.Tensor:  # rank-major concatenation
        return torch.cat([_local_batch(step, r) for r in range(WORLD)])

    # Size 12, global batch 4: steps 0-2 fill slots 0-11, step 3 wraps and overwrites slots 0-3.
    want = torch.cat([global_batch(3), global_batch(1), global_batch(2)])
    assert ranks[0]["ptrs"] == [4, 8, 0, 4]
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["feats"], want, rtol=0, atol=0)
        assert ranks[r]["ptrs"] == ranks[0]["ptrs"]
    torch.testing.assert_close(ranks[0]["initial"], ranks[1]["initial"], rtol=0, atol=0)
