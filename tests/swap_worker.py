"""Run by test_rank_life.py under torchrun with 3 gloo ranks: rank 0 plays rollout, ranks 1-2 policy."""
from datetime import timedelta

import torch
import torch.distributed as dist

from tgrpo.job.rank_life import make_default_group

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
world = dist.new_group([0, 1, 2], timeout=timedelta(seconds=60))
policy = dist.new_group([1, 2], timeout=timedelta(seconds=60))
sync = dist.new_group([0, 1], timeout=timedelta(seconds=60))
if rank in (1, 2):
    make_default_group(policy)
    assert dist.get_world_size() == 2, dist.get_world_size()
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)  # no group: must now mean the policy group only
    assert t.item() == 3.0, t.item()
else:
    assert dist.get_world_size() == 3
if rank in (0, 1):
    t = torch.tensor([float(rank == 1) * 42.0])
    dist.broadcast(t, group=sync, group_src=1)  # group-relative source: rank 1 is index 1 of [0, 1]
    assert t.item() == 42.0, t.item()
print(f"rank {rank} ok", flush=True)
dist.barrier(group=world)  # no rank leaves while others still use its connections
dist.destroy_process_group()
