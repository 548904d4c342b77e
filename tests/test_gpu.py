"""What only GPUs show; skipped elsewhere (CI has none). Run on the H200 machines (see bench/README.md)."""
import os
import pickle
import sys

import pytest
import torch

from helpers import run

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: NCCL")


@two_gpus
def test_the_hang_report_holds_nccls_flight_recorder(tmp_path):
    """A rank 20 s late to an NCCL all_reduce: the watchdog (limit 5 s) names the waiting rank and writes, beside
    the report, every rank's Python stacks and NCCL flight recorder, which shows the all_reduce still waiting."""
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "tests/hang_worker.py",
                  str(tmp_path)], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "in one phase for over 5 s" in result.stdout + result.stderr
    assert "late all_reduce" in (tmp_path / "hang-report.txt").read_text()
    assert (tmp_path / "stacks-rank0.txt").exists() and (tmp_path / "stacks-rank1.txt").exists()
    trace = pickle.loads((tmp_path / "nccl-trace-rank0").read_bytes())
    entries = trace["entries"]
    assert any("all_reduce" in e["profiling_name"] for e in entries), entries[-1]
    assert entries[-1]["state"] != "completed", entries[-1]  # the late one, waiting when the report was made
    print({k: entries[-1][k] for k in ("profiling_name", "state", "collective_seq_id") if k in entries[-1]})
