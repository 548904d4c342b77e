"""The watchdog and the start-up guards on real objects: heartbeats through a real c10d TCPStore between watchdogs
of several ranks (their threads, as in a job), build locks held open by real processes, and the root-cause line
that node.sh prints from a hung job's log."""
import os
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from helpers import free_port
from tgrpo.job import build_locks, watchdog
from tgrpo.config import Config
from tgrpo.job.failures import root_cause
from tgrpo.job.watchdog import Watchdog


def test_by_default_a_frozen_rank_is_named_before_a_collective_times_out():
    """Issue 25: hang_report_s equalled dist_timeout_s (600 s both), so a frozen rank ended the job unnamed."""
    cfg = Config()
    hang, startup = watchdog.limits(cfg.hang_report_s, cfg.startup_report_s, cfg.dist_timeout_s)
    assert hang <= 0.25 * cfg.dist_timeout_s and startup < cfg.dist_timeout_s
    # a shorter collective timeout pulls both reports in ahead of it
    assert watchdog.limits(cfg.hang_report_s, cfg.startup_report_s, 60) == (48, 48)


@pytest.fixture
def store():
    s = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, wait_for_workers=False)
    yield s


@pytest.fixture
def fast_beats(monkeypatch):
    monkeypatch.setattr(watchdog, "HEARTBEAT_S", 0.2)


def _lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _wait_for(predicate, seconds: float):
    deadline = time.time() + seconds
    while not predicate() and time.time() < deadline:
        time.sleep(0.1)
    return predicate()


@pytest.mark.parametrize("frozen", [2, 0])
def test_a_silent_rank_is_named_once_with_every_ranks_stacks(tmp_path, store, fast_beats, capsys, frozen):
    """A rank falls silent mid-step: rank 0 (rank 1 when rank 0 is the silent one) names it in one line and writes
    the report; the ranks still running write their stacks. The others then stall waiting for it, and it stays
    silent: no second line."""
    roles = ["rollout", "policy", "policy"]
    dogs = [Watchdog(store, r, 3, roles[r], str(tmp_path), report_after_s=2.0) for r in range(3)]
    running = [r for r in range(3) if r != frozen]
    try:
        dogs[frozen].at(4, "train")
        time.sleep(0.5)
        dogs[frozen].stop()  # frozen: no more heartbeats
        time.sleep(0.5)
        for r in running:
            dogs[r].at(4, "train")  # the others reach their next collective, where they will wait for it
        assert _wait_for(lambda: (tmp_path / "hang-report.txt").exists(), 10)
        assert _wait_for(lambda: all((tmp_path / f"stacks-rank{r}.txt").exists() for r in running), 5)
        time.sleep(3)  # the others now in "train" for over report_after_s: stalled behind the silent rank
        lines = _lines(capsys)
        assert len(lines) == 1 and lines[0].startswith(
            f"error: no heartbeat for over 2 s from rank {frozen} ({roles[frozen]}"), lines
        assert "last at step 4, train" in lines[0]
        report = (tmp_path / "hang-report.txt").read_text()
        assert f"silent ranks [{frozen}]" in report and "rank 1 policy" in report
        assert "test_watchdog" in (tmp_path / f"stacks-rank{running[0]}.txt").read_text()  # this process's threads
        # and as node.sh reads it afterwards: the hang is the cause, not the kill that ended the frozen rank
        assert root_cause(lines[0] + "\n").startswith(f"rank {frozen} ({roles[frozen]} on ")
        assert " hung: " in root_cause(lines[0])
    finally:
        for dog in dogs:
            dog.stop()


def test_a_rank_still_starting_after_the_limit_is_named_with_what_it_does(tmp_path, store, fast_beats, capsys):
    """Start-up is watched too: a rank that has been loading for longer than startup_report_s is named with its
    phase, and asked for its stacks; ranks starting within the limit are not."""
    dogs = [Watchdog(store, r, 2, ["rollout", "policy"][r], str(tmp_path), report_after_s=30.0, startup_after_s=1.5)
            for r in range(2)]
    try:
        dogs[0].at(0, "start-up: starting its vLLM engine")
        dogs[1].at(0, "start-up: waiting for a build lock held by pid 1 (ninja): /x/lock")
        time.sleep(1.0)
        dogs[0].at(1, "generate")  # rank 0 got going: only rank 1 is late
        assert _wait_for(lambda: (tmp_path / "stacks-rank1.txt").exists(), 10)
        lines = _lines(capsys)
        assert len(lines) == 1 and lines[0].startswith("warning: rank 1 (policy on "), lines
        assert "start-up: waiting for a build lock held by pid 1" in lines[0] and "still starting after 1.5 s" in lines[0]
    finally:
        for dog in dogs:
            dog.stop()


def _hold_open(path: str) -> subprocess.Popen:
    """A process that holds `path` open as torch's FileBaton does while it builds."""
    proc = subprocess.Popen([sys.executable, "-c", "import os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                             "print('ready', flush=True); time.sleep(600)", path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_stale_build_lock_is_removed_and_a_held_one_waited_for(tmp_path):
    """A build killed midway leaves <op>/lock behind: removed at once, in one line (torch would wait for it
    forever). A lock a live build holds open is waited for, its holder named; when the holder dies without removing
    it, it is removed and start-up goes on."""
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    said = []
    assert build_locks.wait_for_build_locks(said.append, root=str(tmp_path)) == [str(stale)]
    assert not stale.exists() and len(said) == 1 and "stale build lock" in said[0] and str(stale) in said[0]

    held = tmp_path / "cpu_adam" / "lock"
    held.parent.mkdir()
    held.write_text("")
    holder = _hold_open(str(held))
    said.clear()
    phases = []
    started = time.time()
    import threading

    killer = threading.Timer(3.0, holder.kill)
    killer.start()
    try:
        removed = build_locks.wait_for_build_locks(said.append, phases.append, root=str(tmp_path))
    finally:
        killer.cancel()
        holder.kill()
        holder.wait()
    assert removed == [str(held)] and not held.exists() and time.time() - started >= 3.0
    assert said[0].startswith("waiting for the build of cpu_adam") and f"pid {holder.pid}" in said[0], said
    assert phases and phases[0].startswith(f"waiting for a build lock held by pid {holder.pid}")
    assert "stale build lock" in said[1]


def test_no_lock_means_no_wait(tmp_path):
    assert build_locks.wait_for_build_locks(pytest.fail, root=str(tmp_path / "missing")) == []
    (tmp_path / "op").mkdir()
    assert build_locks.wait_for_build_locks(pytest.fail, root=str(tmp_path)) == []
