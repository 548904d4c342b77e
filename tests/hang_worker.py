"""Run by tests/test_gpu.py under torchrun with 2 GPUs: rank 1 joins an NCCL all_reduce 20 s late; the watchdog of
rank 0 reports the wait, with every rank's Python stacks and NCCL flight recorder beside the report."""
import os
import sys
import time

import torch
import torch.distributed as dist

from tgrpo.job import rank_life
from tgrpo.job.watchdog import Watchdog

log_dir = sys.argv[1]
os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")  # as rank_life.run sets it
rank_life.init("nccl", 120)
rank = dist.get_rank()
watch = Watchdog(rank_life.default_store(), rank, 2, "policy", log_dir, 5.0, nccl_trace=rank_life.nccl_trace)
x = torch.ones(1 << 20, device="cuda")
for _ in range(3):
    dist.all_reduce(x)
torch.cuda.synchronize()
watch.at(1, "late all_reduce")
if rank == 1:
    time.sleep(20)
dist.all_reduce(x)
torch.cuda.synchronize()
watch.stop()
dist.destroy_process_group()
