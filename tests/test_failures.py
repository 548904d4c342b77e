"""A rollout engine that dies mid-run: the job ends by itself with one line naming the rank, the role and the cause,
and leaves no process behind. A frozen rank named by the hang report, then Ctrl-C to node.sh run as a script's
background job; build locks left at start-up; the root-cause line read from torchrun's summary."""
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import JobWatch, alive, descendants, finish, free_port, is_rank, shm, start


@pytest.mark.slow
def test_a_dead_vllm_engine_ends_the_job_with_one_line(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", str(free_port()),
           "train_grpo.py", "--config", "configs/default.yaml", "--max_steps", "200", "--prompts_per_step", "8",
           "--micro_batch_size", "8", "--dist_timeout_s", "60", "--output_dir", str(out)]
    log = tmp_path / "run.log"
    proc = start(cmd, log=str(log))
    deadline = time.time() + 600
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, "the run did not reach its first step"
        time.sleep(1)
    everything = descendants(proc.pid)
    engines = [pid for pid in everything if open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"VLLM::EngineCore")]
    assert len(engines) == 1, engines
    started = time.time()
    os.kill(engines[0], signal.SIGKILL)
    result = finish(proc, 300)
    assert result.returncode != 0 and time.time() - started < 180  # well within dist_timeout_s of the others
    ours = [line for line in log.read_text().splitlines() if line.startswith("[rank")]
    assert ours and ours[0].startswith("[rank 0 rollout] error: "), log.read_text()[-3000:]
    # the engine named by its pid, whichever saw it first (the watcher, or a call into vLLM that raised
    # EngineDeadError 'see stack trace above', which it often read)
    assert f"the vLLM engine process {engines[0]} died" in ours[0], ours
    assert (out / "logs" / "error-rank0.log").exists()
    deadline = time.time() + 30
    while alive(everything) and time.time() < deadline:
        time.sleep(1)
    assert not alive(everything)


SUMMARY = """{own}Failures:
[1]:
  time      : 2026-11-30_19:23:21
  host      : node-a
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 26593)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 26593
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_19:23:21
  host      : node-a
  rank      : 1 (local_rank: 1)
  exitcode  : {code} (pid: 26594)
  error_file: <N/A>
"""


def test_root_cause_names_the_killed_rank_not_torchruns_sigterm_or_the_survivors():
    """torchrun's summary as it prints it: the rank killed by SIGKILL is the cause, not the ranks torchrun then
    stopped with SIGTERM nor a survivor's connection error; without a signal, the first rank's own error line."""
    from tgrpo.job.failures import root_cause

    survivor = "[rank 0 rollout] error: RuntimeError: Connection reset by peer (traceback: x.log)\n"
    assert root_cause(SUMMARY.format(own=survivor, code="-9")) == (
        "rank 1 (local rank 1 on node-a, pid 26594) was killed by SIGKILL; 1 other rank stopped after it")
    assert root_cause(SUMMARY.format(own="", code="-11")).startswith("rank 1 (local rank 1 on node-a, pid 26594) "
                                                                     "was killed by SIGSEGV")
    assert root_cause(SUMMARY.format(own=survivor, code="1")) == (
        "rank 0 rollout failed: RuntimeError: Connection reset by peer (traceback: x.log)")
    assert root_cause("no failure here\n") is None


def test_root_cause_is_the_jobs_own_error_not_a_rank_that_torchrun_stopped():
    """An error every rank meets alike (a JobError or ConfigError after start-up: NaN weights, the NaN guard's stop)
    is said once by rank 0 as `error: ...`, without a rank prefix; every rank exits 1, those torchrun stops meanwhile
    143. The job's line is the cause (it read 'rank 1 (local rank 1 on node-a) exited with status 143'); without it,
    torchrun's root cause, never a rank it stopped."""
    from tgrpo.job.failures import root_cause

    stopped = SUMMARY.replace("exitcode  : -15 (pid: 26593)  (SIGTERM)", "exitcode  : 143 (pid: 26593)")
    job = "grpo:  40%|####      | 2/5\rerror: step 2: the policy's weights hold 4 NaN/inf values, not saved: the run stops\n"
    assert root_cause(stopped.format(own=job.split("\r")[1], code="1")) == (
        "step 2: the policy's weights hold 4 NaN/inf values, not saved: the run stops")
    assert root_cause(stopped.format(own="", code="1")) == "rank 1 (local rank 1 on node-a) exited with status 1"
    node_sh = "error: rank 1 (local rank 1 on node-a) exited with status 1 (log: out/logs/node0.log)\n"
    assert root_cause(stopped.format(own=node_sh, code="1")) == "rank 1 (local rank 1 on node-a) exited with status 1"


@pytest.mark.slow
def test_a_frozen_rank_is_named_by_the_hang_report_and_ctrl_c_stops_node_sh_run_as_a_background_job(tmp_path):
    """SIGSTOP of a policy rank mid-run under launch/node.sh: within hang_report_s + 30 s rank 0 prints one line
    naming the frozen rank and writes a report of where every rank is, with the Python stacks of those still
    running; long before dist_timeout_s would end the job. Then Ctrl-C, as its user would: node.sh ends with status
    130 and one line saying so (not a rank's KeyboardInterrupt), and no process of the job and nothing in /dev/shm
    is left.

    node.sh runs here as wrappers and schedulers start it, as a script's background job (`bash launch/node.sh ... &`),
    which inherits SIGINT ignored, and bash can neither trap nor reset a signal ignored on entry: Ctrl-C was never
    acted on and the run went on to `done`, exit 0. Its output goes through a process substitution too
    (`> >(tee ...)`), with which node.sh could wait forever after Ctrl-C in `wait "$sampler"`. (One job for both
    cases: a job of its own for the background Ctrl-C cost CI ~2 minutes.)"""
    out = tmp_path / "out"
    log = tmp_path / "console.txt"
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text(  # the wrapper ignores Ctrl-C itself, so that it outlives it and reports node.sh's status
        "trap '' INT\n"
        f"bash launch/node.sh 0 127.0.0.1 -- --max_steps 200 --prompts_per_step 8 --micro_batch_size 8 "
        f"--hang_report_s 15 --dist_timeout_s 600 --output_dir {out} > >(tee {log}) 2>&1 &\n"
        "wait $!\necho \"node.sh exited $?\"\n")
    shm_before = shm()
    proc = start(["bash", str(wrapper)], env={"PYTHON": sys.executable, "MASTER_PORT": str(free_port())},
                 log=str(tmp_path / "wrapper.out"))
    everything: set[int] = set()
    console = lambda: log.read_text() if log.exists() else ""  # noqa: E731
    try:
        with JobWatch(proc) as watch:
            deadline = time.time() + 600
            metrics = out / "metrics.jsonl"
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
                assert proc.poll() is None and time.time() < deadline, console()[-3000:]
                time.sleep(0.5)
            everything = watch.sample() - {proc.pid}
            ranks = [pid for pid in everything if is_rank(pid)]
            victim = next(pid for pid in ranks if b"RANK=2" in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"))
            os.kill(victim, signal.SIGSTOP)
            frozen_at = time.time()
            report = out / "logs" / "hang-report.txt"
            while not report.exists() or "error: no heartbeat" not in console():
                assert time.time() - frozen_at < 15 + 30, console()[-3000:]
                time.sleep(1)
            named = [line for line in console().split("\n") if line.startswith("error: no heartbeat")]
            assert len(named) == 1 and f"from rank 2 (policy" in named[0] and f"pid {victim}" in named[0], named
            text = report.read_text()
            assert "silent ranks [2]" in text and "rank 0 rollout" in text and "rank 1 policy" in text, text
            time.sleep(2 * 2.0 + 1)  # the ranks still running write their stacks at their next heartbeat
            assert (out / "logs" / "stacks-rank0.txt").exists() and (out / "logs" / "stacks-rank1.txt").exists()
            os.kill(victim, signal.SIGCONT)
            everything |= watch.sample() - {proc.pid}
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: the wrapper's whole process group
            finish(proc, 180)
        said = (tmp_path / "wrapper.out").read_text().strip().splitlines()
        assert said[-1] == "node.sh exited 130", console()[-3000:]  # the shell's status for SIGINT (it was 1, or 0)
        text = console()
        assert "interrupted (Ctrl-C/SIGINT): the job was stopped, not failed" in text, text[-3000:]
        assert "done: " not in text, text[-3000:]
        assert "KeyboardInterrupt" not in text and "Traceback" not in text, text[-3000:]
        deadline = time.time() + 30
        while alive(everything) and time.time() < deadline:
            time.sleep(1)
        assert not alive(everything), [open(f"/proc/{pid}/cmdline", "rb").read()[:120] for pid in alive(everything)]
        assert not watch.left(shm_before), watch.left(shm_before)
    finally:
        for pid in everything | descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_build_locks_at_start_up_are_named_waited_for_or_removed(tmp_path):
    """Issue 25: a policy rank killed while DeepSpeed built its op left torch's build lock, and every later job waited
    at start-up, silently, until its collectives timed out. Under plain torchrun, with a copy of the suite's extensions
    folder: a lock no process holds (a killed build's) is removed in one line; the op's lock, held open by a live
    process (a build in progress), is waited for with its holder named, and past startup_report_s the watchdog names
    the rank and what it waits for, its stacks written; when the holder dies without removing the lock, the lock is
    removed and the job goes on to the end."""
    import shutil

    ext = tmp_path / "ext"
    shutil.copytree(os.environ["TORCH_EXTENSIONS_DIR"], ext, symlinks=True)  # the built op, timestamps kept
    (ext / "cpu_adam").mkdir()
    (ext / "cpu_adam" / "lock").write_text("")  # a killed build's
    held = ext / "deepspeed_shm_comm" / "lock"
    held.write_text("")
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "time.sleep(900)", str(held)])
    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port",
                  str(free_port()), "train_grpo.py", "--max_steps", "1", "--prompts_per_step", "4",
                  "--micro_batch_size", "8", "--startup_report_s", "8", "--output_dir", str(out)],
                 env={"TORCH_EXTENSIONS_DIR": str(ext)}, log=str(log))
    try:
        deadline = time.time() + 300

        def policy_named() -> list[str]:  # on a busy machine rank 0's engine may be named first, on its own line
            return [line for line in log.read_text().splitlines()
                    if "still starting after 8 s" in line and "rank 1 (policy" in line]
        while not policy_named():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        console = log.read_text()
        assert f"removed a stale build lock that no process holds (a build of cpu_adam stopped midway)" in console
        assert not (ext / "cpu_adam" / "lock").exists()
        waiting = [line for line in console.splitlines() if "waiting for the build of deepspeed_shm_comm" in line]
        assert len(waiting) == 2 and all(f"pid {holder.pid}" in line for line in waiting), console[-3000:]  # 2 ranks
        named = policy_named()
        assert len(named) == 1 and "rank 2 (policy" in named[0], named
        assert f"start-up: waiting for a build lock held by pid {holder.pid}" in named[0]
        deadline = time.time() + 10
        while not (out / "logs" / "stacks-rank1.txt").exists() and time.time() < deadline:
            time.sleep(0.5)
        assert "wait_for_build_locks" in (out / "logs" / "stacks-rank1.txt").read_text()
        holder.kill()  # dies without removing the lock, as a killed build does
        result = finish(proc, 300)
        console = log.read_text()
        assert result.returncode == 0 and "done: 1 steps" in console, console[-3000:]
        assert "removed a stale build lock that no process holds (a build of deepspeed_shm_comm" in console
    finally:
        holder.kill()
        holder.wait()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
