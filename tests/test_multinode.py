"""Launching for real: two node.sh processes as two nodes, a node that never joins, a crashed rank, srun-style
start-up from SLURM's variables, and accelerate launch. Every test bounds its processes' lifetime."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from helpers import ROOT, finish, free_port, run, start

pytestmark = pytest.mark.slow  # torchrun jobs: pytest -m "not slow" leaves them out

SHORT = ["--max_steps", "2", "--prompts_per_step", "8", "--micro_batch_size", "8"]


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    return start(cmd, {"PYTHON": sys.executable, **env})


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    result = finish(proc, timeout)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.skipif(shutil.which("tmux") is not None, reason="the tmux test runs two nodes (tests/test_launch.py)")
def test_two_node_processes_train_to_completion(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# node 0 holds ranks 0-1, node 1 rank 2\n127.0.0.1 slots=2\n127.0.0.1 slots=1\n")
    env = {"HOSTFILE": str(hostfile), "MASTER_PORT": str(free_port()), "LOG_DIR": str(tmp_path / "logs")}
    nodes = [_start(["bash", "launch/node.sh", str(n), "127.0.0.1", "--", *SHORT, "--output_dir",
                     str(tmp_path / "out")], env) for n in (0, 1)]
    results = [_finish(p, 900) for p in nodes]
    for status, _, err in results:
        assert status == 0, err[-3000:]
    assert len(open(tmp_path / "out" / "metrics.jsonl").readlines()) == 2
    assert (tmp_path / "logs" / "node0.log").exists() and (tmp_path / "logs" / "node1.log").exists()
    assert "node 1/2: 1 processes" in results[1][1]


def test_a_node_that_never_joins_ends_the_job_with_a_clear_message(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=2\n127.0.0.2 slots=1\n")
    env = {"HOSTFILE": str(hostfile), "MASTER_PORT": str(free_port()), "LOG_DIR": str(tmp_path / "logs"),
           "JOIN_TIMEOUT_S": "15"}
    started = time.time()
    status, _, err = _finish(_start(["bash", "launch/node.sh", "0", "127.0.0.1", "--", *SHORT, "--output_dir",
                                     str(tmp_path / "out")], env), 180)
    assert status != 0
    assert "error: not all 2 nodes" in err and "JOIN_TIMEOUT_S=15" in err
    assert time.time() - started < 150


def test_trainer_started_by_srun_reads_slurm_variables(tmp_path):
    """srun with one task per GPU and no torchrun: ranks come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID."""
    port = str(free_port())
    tasks = [_start([sys.executable, "train_grpo.py", "--config", "configs/default.yaml", *SHORT, "--output_dir",
                     str(tmp_path / "out")],
                    {"SLURM_PROCID": str(i), "SLURM_NTASKS": "3", "SLURM_LOCALID": str(i),
                     "SLURM_NTASKS_PER_NODE": "3", "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1", "MASTER_PORT": port,
                     "PYTHONPATH": ROOT}) for i in range(3)]
    for status, _, err in [_finish(t, 900) for t in tasks]:
        assert status == 0, err[-3000:]
    assert len(open(tmp_path / "out" / "metrics.jsonl").readlines()) == 2


def test_accelerate_launch_trains_a_short_run(tmp_path):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    result = run([accelerate, "launch", "--config_file", "accelerate_config.yaml", "--main_process_port",
                  str(free_port()), "train_grpo.py", "--config", "configs/default.yaml", *SHORT, "--output_dir",
                  str(tmp_path / "out")], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert len(metrics) == 2
