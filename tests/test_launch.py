"""Launch scripts: check.sh (cluster readiness), slurm.sbatch (per-node task), tmux.sh (start, stop)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, JobWatch, alive, finish, free_port, run, shm, start, torchrun
from tgrpo.job import checkpoint

PYTHON = {"PYTHON": sys.executable}


@pytest.mark.slow
def test_check_sh_passes_with_the_hostfile_world(tmp_path):
    result = run(["bash", "launch/check.sh", "0", "127.0.0.1"], timeout=180,
                 env={**PYTHON, "MASTER_PORT": str(free_port()), "LOG_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # the process table: one row per rank of the default hostfile (localhost slots=3)
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["rank", "node", "host"])
    rows = [line.split() for line in lines[header + 2:header + 5]]
    assert [r[0] for r in rows] == ["0", "1", "2"] and [r[3] for r in rows] == ["0", "1", "2"], result.stdout
    assert all(r[4] == "cpu" for r in rows), result.stdout
    assert any(line.startswith("all_reduce ") for line in lines) and any(line.startswith("broadcast ") for line in lines)
    report = json.loads(next(line for line in lines if line.startswith("{")))
    assert report["check"] == "ok" and report["world_size"] == 3 and report["backend"] == "gloo"
    assert [r["size_mib"] for r in report["all_reduce"]] == [1, 4, 16, 64]
    assert all(r["algbw_gbps"] > 0 for r in report["all_reduce"] + report["broadcast"])


@pytest.mark.slow
def test_check_sh_fails_in_one_line_on_a_wrong_count(tmp_path):
    result = run(["bash", "launch/check.sh", "0", "127.0.0.1", "4"], timeout=120,
                 env={**PYTHON, "MASTER_PORT": str(free_port()), "LOG_DIR": str(tmp_path), "CHECK_SIZES_MIB": "1"})
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: world size is 3") and "expected 4" in lines[0], result.stderr


CORRUPTING_CHECK = '''
import os, sys
import torch.distributed as dist
sys.path.insert(0, os.path.join({root!r}, "launch"))
import check_cluster

real_all_reduce, done = dist.all_reduce, []

def all_reduce(tensor, *args, **kwargs):  # rank 2 gets one wrong value from its first large all-reduce
    work = real_all_reduce(tensor, *args, **kwargs)
    if os.environ["RANK"] == "2" and tensor.numel() > 1000 and not done:
        done.append(1)
        tensor[5] += 1
    return work

dist.all_reduce = all_reduce
sys.exit(check_cluster.main())
'''


@pytest.mark.slow
def test_check_finds_a_wrong_all_reduce_value(tmp_path):
    script = tmp_path / "corrupting_check.py"
    script.write_text(CORRUPTING_CHECK.format(root=ROOT))
    result = torchrun([str(script), "--expected", "3", "--sizes_mib", "1"], nproc=3, timeout=120)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: all-reduce of 1 MiB on rank 2: 1 of 262144 values wrong"], result.stderr[-3000:]
    assert '"check": "ok"' not in result.stdout


@pytest.mark.slow
def test_check_sh_missing_node_ends_with_a_clear_line(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\nnode-b slots=1\n")
    result = run(["bash", "launch/check.sh", "0", "127.0.0.1"], timeout=60,
                 env={**PYTHON, "HOSTFILE": str(hostfile), "MASTER_PORT": str(free_port()), "LOG_DIR": str(tmp_path),
                      "CHECK_TIMEOUT_S": "3"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not all meet" in lines[0] and "1/2 clients joined" in lines[0], result.stderr


SCONTROL = r'''#!/usr/bin/env python3
"""Stand-in for SLURM's `scontrol show hostnames LIST`: expands node[01-02],gpu[7,9] and plain names."""
import re, sys
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", sys.argv[3]):
    m = re.fullmatch(r"(.*)\[(.*)\]", part)
    for r in (m.group(2).split(",") if m else []):
        a, _, b = r.partition("-")
        for i in range(int(a), int(b or a) + 1):
            print(f"{m.group(1)}{i:0{len(a)}d}")
    if not m:
        print(part)
'''

# srun stand-in: runs the step's command once per node of a 2-node job, as SLURM would on each node
SRUN = '''#!/usr/bin/env bash
while [ "${1#--}" != "$1" ]; do shift; done
for id in 0 1; do SLURM_NODEID=$id "$@" || exit; done
'''

# node.sh runs $PYTHON for the pre-flight and the master port check (both pass here) and torchrun (printed here
# instead of run)
FAKE_PYTHON = '''#!/usr/bin/env bash
if [ "$2" = tgrpo.job.preflight ] || [ "$1" = -c ]; then exit 0; fi
if [ "$1" = launch/tee.py ]; then exec tee -a "$2"; fi  # node.sh's console tee
echo "PYTHON $*"
'''


def _slurm_env(tmp_path, node_id: int, **extra) -> dict:
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    for name, text in {"scontrol": SCONTROL, "python": FAKE_PYTHON, "srun": SRUN}.items():
        (stub / name).write_text(text)
        (stub / name).chmod(0o755)
    return {"PATH": f"{stub}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-02]",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": str(node_id), "SLURM_GPUS_ON_NODE": "4",
            "LOG_DIR": str(tmp_path / f"logs{node_id}"), "MASTER_PORT": "", "DRY_RUN": "", **extra}


@pytest.mark.parametrize("node_id", [0, 1])
def test_slurm_task_runs_node_sh_with_this_nodes_rank(tmp_path, node_id):
    env = _slurm_env(tmp_path, node_id, DRY_RUN="1")
    result = run(["bash", "launch/slurm.sbatch", "--task", "--", "--max_steps", "5"], timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    logs = tmp_path / f"logs{node_id}"
    assert result.stdout.strip() == (f"HOSTFILE={logs}/hostfile MASTER_PORT=24242 LOG_DIR={logs} "
                                     f"bash launch/node.sh {node_id} node01 -- --max_steps 5")
    hosts = [line for line in (logs / "hostfile").read_text().splitlines() if not line.startswith("#")]
    assert hosts == ["node01 slots=4", "node02 slots=4"]


def test_sbatch_batch_step_runs_one_task_per_node(tmp_path):
    env = _slurm_env(tmp_path, 0, DRY_RUN="1", SLURM_NODEID="", SLURM_SUBMIT_DIR=ROOT, LOG_DIR=str(tmp_path / "logs"))
    result = run(["bash", "launch/slurm.sbatch", "--", "--max_steps", "5"], timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("job 4242: nodes node[01-02], master node01, 4 processes per node"), lines
    logs = tmp_path / "logs"
    assert lines[1:] == [f"HOSTFILE={logs}/hostfile MASTER_PORT=24242 LOG_DIR={logs} "
                         f"bash launch/node.sh {node} node01 -- --max_steps 5" for node in (0, 1)], lines


@pytest.mark.parametrize("node_id", [0, 1])
def test_slurm_task_gives_the_exact_torchrun_command(tmp_path, node_id):
    """The real node.sh runs, with a python stand-in that prints the torchrun command it is given."""
    env = _slurm_env(tmp_path, node_id, PYTHON=str(tmp_path / "bin" / "python"), SLURM_GPUS_ON_NODE="",
                     GPUS_PER_NODE="2")
    result = run(["bash", "launch/slurm.sbatch", "--task", "--", "--max_steps", "5"], timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    torchrun = [line.split() for line in result.stdout.splitlines() if line.startswith("PYTHON ")]
    assert len(torchrun) == 1 and torchrun[0][1:3] == ["-m", "torch.distributed.run"], result.stdout
    # torchrun's own options (node.sh may add more, e.g. timeouts), then the script and its arguments
    words = torchrun[0][3:]
    script = words.index("train_grpo.py")
    options = dict(zip(words[:script:2], words[1:script:2]))
    assert {k: options.get(k) for k in ("--nnodes", "--node_rank", "--nproc_per_node", "--master_addr",
                                        "--master_port")} == \
        {"--nnodes": "2", "--node_rank": str(node_id), "--nproc_per_node": "2", "--master_addr": "node01",
         "--master_port": "24242"}, result.stdout
    assert words[script:] == ["train_grpo.py", "--config", "configs/default.yaml", "--max_steps", "5"]


def test_slurm_task_outside_slurm_says_so(tmp_path):
    env = {k: "" for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODEID")}
    result = run(["bash", "launch/slurm.sbatch", "--task"], timeout=30, env=env)
    assert result.returncode == 2 and result.stderr.startswith("error: SLURM_JOB_ID is not set"), result.stderr


def test_tmux_dry_run_uses_ssh_for_other_hosts(tmp_path):
    hostfile = tmp_path / "hostfile"
    me = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    hostfile.write_text(f"{me} slots=2\nnode-b slots=1\n")
    result = run(["bash", "launch/tmux.sh", "start", "--", "--max_steps", "2"], timeout=30,
                 env={"DRY_RUN": "1", "HOSTFILE": str(hostfile), "TMUX_SESSION": "t"})
    assert result.returncode == 0, result.stderr
    node0, node1 = result.stdout.strip().splitlines()
    root = os.path.realpath(ROOT)
    assert node0.startswith(f"node0: cd {root} && env TGRPO_TMUX_RUN=t:{root} ") and \
        f"bash launch/node.sh 0 {me} -- --max_steps 2;" in node0, node0
    assert node1.startswith("node1: ssh -tt node-b ") and f"launch/node.sh\\ 1\\ {me}\\ --\\ --max_steps\\ 2;" in node1
    hostfile.write_text("localhost slots=2\nnode-b slots=1\n")
    result = run(["bash", "launch/tmux.sh", "start"], timeout=30, env={"DRY_RUN": "1", "HOSTFILE": str(hostfile)})
    assert result.returncode == 2 and "must be a name the other hosts can reach" in result.stderr


def _tagged(tag: str) -> set[int]:
    """Live (not zombie) processes whose environment carries tmux.sh's tag."""
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"TGRPO_TMUX_RUN={tag}".encode() in environ and state != "Z":
            pids.add(int(pid))
    return pids


def _run_processes(marker: str) -> dict[int, str]:
    """Live torchrun and train_grpo.py processes whose command line names `marker` (the run's output dir)."""
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in args and ("train_grpo.py" in args or "torch.distributed.run" in args):
            procs[int(pid)] = args
    return procs


def _wait_for(predicate, timeout: float, every: float = 2.0):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value or time.time() > deadline:
            return value
        time.sleep(every)


@pytest.mark.slow
def test_tmux_start_runs_the_job_and_stop_ends_it(tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    session = f"tgrpo-test-{os.getpid()}"
    out = tmp_path / "out"
    log = tmp_path / "logs" / "node0.log"
    hostfile = tmp_path / "hostfile"  # two nodes on this machine: a window each, ranks 0-1 and rank 2
    hostfile.write_text("127.0.0.1 slots=2\n127.0.0.1 slots=1\n")
    env = {**PYTHON, "TMUX_SESSION": session, "MASTER_PORT": str(free_port()), "LOG_DIR": str(tmp_path / "logs"),
           "STOP_GRACE_S": "15", "HOSTFILE": str(hostfile)}
    tag = f"{session}:{os.path.realpath(ROOT)}"
    tail = lambda: log.read_text()[-3000:] if log.exists() else "(no node0.log)"
    try:
        result = run(["bash", "launch/tmux.sh", "start", "--", "--max_steps", "2", "--output_dir", str(out)],
                     timeout=60, env=env)
        assert result.returncode == 0 and f"tmux session '{session}'" in result.stdout, result.stderr
        again = run(["bash", "launch/tmux.sh", "start"], timeout=30, env=env)
        assert again.returncode == 2 and "already exists" in again.stderr
        # two torchruns and 3 ranks, every one tagged (the ranks run in sessions of their own, so only the tag finds them)
        procs = _wait_for(lambda: len(_run_processes(str(out))) >= 5 and _run_processes(str(out)), 120)
        assert procs, f"2 torchruns and 3 ranks did not start within 120 s\n{tail()}"
        assert set(procs) <= _tagged(tag), (procs, _tagged(tag))
        metrics = out / "metrics.jsonl"
        has_step = lambda: metrics.exists() and metrics.read_text().strip()
        assert _wait_for(has_step, 330), f"no step within 330 s\n{tail()}"
        assert "step" in json.loads(metrics.read_text().splitlines()[0])  # a step across both nodes
        assert (tmp_path / "logs" / "node1.log").exists()  # node 1's torchrun (rank 2) wrote its log
    finally:
        stop = run(["bash", "launch/tmux.sh", "stop"], timeout=90, env=env)
    assert stop.returncode == 0, stop.stderr
    assert f"tmux session '{session}' closed" in stop.stdout, stop.stdout
    assert not _tagged(tag), stop.stdout
    assert not _run_processes(str(out)), _run_processes(str(out))
    assert subprocess.run(["tmux", "has-session", "-t", f"={session}"], capture_output=True).returncode != 0


@pytest.mark.slow
def test_readme_main_job_prints_one_screen_and_logs_the_rest(tmp_path):
    """The README's main job (node.sh, the embedded default, 30 steps): the console holds the progress bar, the
    milestones and the save, at most 60 lines (a progress-bar redraw counts once) and no warning twice; library
    output (vLLM, DeepSpeed, Python warnings) is in the node's log file under the run's output_dir, not on the
    console. A weight buffer left in /dev/shm by a rank that is gone is removed."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"/dev/shm/tgrpo-rank0-{gone.pid}.bin"
    open(stale, "wb").close()
    log_dir = tmp_path / "out" / "logs"
    shm_before = shm()
    proc = start(["bash", "launch/node.sh", "0", "127.0.0.1", "--", "--output_dir", str(tmp_path / "out")],
                 env={**PYTHON, "MASTER_PORT": str(free_port())})
    with JobWatch(proc) as watch:
        result = finish(proc, 900)
    assert result.returncode == 0, result.stderr[-3000:]
    console = (result.stdout + result.stderr).rstrip("\n").split("\n")  # tqdm's \r-separated redraws: one line
    assert len(console) <= 60, "\n".join(console)
    text = "\n".join(console)
    for milestone in ("ready in", "saved", "done: 30 steps"):
        assert milestone in text, text
    warnings = [line for line in console if "warning" in line.lower()]
    assert len(warnings) == len(set(warnings)), warnings
    for noise in ("FutureWarning", "RotaryEmbedding", "DeepSpeed", "(EngineCore", "resource_tracker"):
        assert noise not in text, (noise, text)
    logged = (log_dir / "node0.log").read_text()
    assert "done: 30 steps" in logged and "WARNING" in logged  # the console's lines and vLLM's own
    # the stale buffer is gone, and the job left nothing of its own (other jobs may run meanwhile: see JobWatch)
    assert not os.path.exists(stale) and not watch.left(shm_before), watch.left(shm_before)


def test_sbatch_preemption_warning_asks_the_job_to_save_and_requeues_it(tmp_path):
    """SLURM's USR1 before the time limit reaches the batch shell: it creates the job's preemption request file
    (which the trainer polls every step) and, once the step has ended, requeues the job; the requeued run (restart
    count 1) resumes."""
    env = _slurm_env(tmp_path, 0, DRY_RUN="1", SLURM_NODEID="", SLURM_SUBMIT_DIR=ROOT, LOG_DIR=str(tmp_path / "logs"))
    stub = tmp_path / "bin"
    (stub / "srun").write_text("#!/usr/bin/env bash\nkill -USR1 $PPID; sleep 2\n"
                               "[ -e \"$TGRPO_PREEMPT_FILE\" ] && echo REQUEST-SEEN\n")
    (stub / "scontrol").write_text(f"#!/usr/bin/env bash\nif [ \"$1\" = requeue ]; then echo \"$@\" > {tmp_path}/requeued;"
                                   f" exit 0; fi\nexec {stub}/scontrol-hosts \"$@\"\n")
    (stub / "scontrol-hosts").write_text(SCONTROL)
    (stub / "scontrol-hosts").chmod(0o755)
    result = run(["bash", "launch/slurm.sbatch", "--", "--max_steps", "5"], timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    assert "REQUEST-SEEN" in result.stdout and "requeueing job 4242" in result.stdout, result.stdout
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    requeued = run(["bash", "launch/slurm.sbatch", "--", "--max_steps", "5"], timeout=30,
                   env={**_slurm_env(tmp_path, 0, DRY_RUN="1", SLURM_NODEID="", SLURM_SUBMIT_DIR=ROOT,
                                     LOG_DIR=str(tmp_path / "logs")), "SLURM_RESTART_COUNT": "1"})
    assert requeued.returncode == 0 and "--resume auto" in requeued.stdout, requeued.stdout


@pytest.mark.slow
def test_node_sh_signals_save_or_stop_the_job_as_meant_and_the_run_resumes(tmp_path):
    """Signals to node.sh as its user means them. SIGUSR1 to node.sh's whole process group (`kill -USR1 -PGID`, a
    scheduler's warning) asks the job to save at the end of its step and stop: exit status 3 (to be requeued, not
    restarted), torchrun and its ranks unharmed (it used to kill torchrun and orphan them). SIGTERM to node.sh alone
    (`kill PID`, which it used to ignore) stops the job now: exit 143 and one line, no traceback on the console.
    Neither leaves a process or a /dev/shm file, and the failed run's node log is kept beside the next one's; the same
    command with --resume auto continues from the saved step."""
    out = tmp_path / "out"
    log = out / "logs" / "node0.log"
    cmd = ["bash", "launch/node.sh", "0", "127.0.0.1", "--", "--max_steps", "8", "--prompts_per_step", "8",
           "--micro_batch_size", "8", "--save_steps", "0", "--output_dir", str(out)]
    env = {**PYTHON, "MASTER_PORT": str(free_port())}
    env.pop("TGRPO_PREEMPT_FILE", None)
    shm_before = shm()

    def steps() -> int:
        return len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0

    def wait_for_step(proc, n: int, console: str) -> None:
        deadline = time.time() + 600
        while steps() < n:
            assert proc.poll() is None and time.time() < deadline, open(console).read()[-3000:]
            time.sleep(0.5)

    proc = start(cmd, env=env, log=str(tmp_path / "first.out"))
    with JobWatch(proc) as watch:
        wait_for_step(proc, 2, tmp_path / "first.out")
        everything = watch.sample() - {proc.pid}
        os.killpg(proc.pid, signal.SIGUSR1)
        first = finish(proc, 300)
    console = open(tmp_path / "first.out").read()
    assert first.returncode == 3, console[-3000:]
    _assert_nothing_left(everything, shm_before, watch)
    stopped = steps()
    assert 2 <= stopped < 8 and f"preempted: stopped after step {stopped}" in console, console[-3000:]
    assert checkpoint.find_latest(str(out)).endswith(f"step-{stopped}")
    first_log = log.read_text()

    # a resume that changes use_lora is refused by the pre-flight (exit 2, never retried, no engine started); it
    # started the engines, failed with exit 1, and MAX_RESTARTS retried the same refusal
    refused = run([*cmd, "--resume", "auto", "--use_lora", "true"], timeout=300,
                  env={**env, "MASTER_PORT": str(free_port()), "MAX_RESTARTS": "2"})
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines() == [
        f"error: checkpoint {out}/checkpoints/step-{stopped} was written by a run training every weight (use_lora "
        "false): resume it with use_lora false, or start over"], refused.stderr
    assert "EngineCore" not in refused.stdout + refused.stderr

    proc = start([*cmd, "--resume", "auto"], env={**env, "MASTER_PORT": str(free_port())},
                 log=str(tmp_path / "second.out"))
    with JobWatch(proc) as watch:
        wait_for_step(proc, stopped + 1, tmp_path / "second.out")
        everything = watch.sample() - {proc.pid}
        os.kill(proc.pid, signal.SIGTERM)
        second = finish(proc, 120)
    console = open(tmp_path / "second.out").read()
    assert second.returncode == 143, console[-3000:]
    assert f"(step {stopped})" in console and "stopped by SIGTERM" in console, console[-3000:]
    assert "Traceback" not in console and "SignalException" not in console, console[-3000:]
    _assert_nothing_left(everything, shm_before, watch)
    assert (out / "logs" / "node0.log.1").read_text() == first_log  # the first run's log, kept
    # the resumed run continued from the saved step: its first step is the one after it (a run resumed to its end
    # is test_train.py's killed-rank test)
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")][:stopped + 1] == \
        list(range(1, stopped + 2))


def test_node_sh_tee_puts_lines_said_beside_the_progress_bar_on_their_own(tmp_path):
    """launch/tee.py copies the job's output to the log and the console. A line another rank prints while rank 0's
    progress bar holds the line open (a stale build lock, the NaN guard, an error) starts on a new line instead of
    being glued to the bar; the bar's own redraws are left alone; the flag node.sh reads says whether the line is
    open, so that its own lines (`SIGTERM: ...`, its last word) start on a new line too."""
    log, flag = tmp_path / "log", tmp_path / "open"
    chunks = [b"starting\n", b"\rgrpo:  20%|##  | 1/5", b"\rgrpo:  40%|####  | 2/5", b"warning: a line\n",
              b"\rgrpo:  60%|######  | 3/5"]
    proc = subprocess.Popen([sys.executable, "launch/tee.py", str(log), str(tmp_path / "quiet"), str(flag)],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    for chunk in chunks:
        proc.stdin.write(chunk)
        proc.stdin.flush()
        time.sleep(0.2)  # one read each, as the job's writes come
    assert flag.read_text() == "1"
    out, _ = proc.communicate(timeout=30)
    assert out == log.read_bytes() == b"".join(chunks[:3]) + b"\n" + b"".join(chunks[3:])


# Ctrl-C to node.sh started as a script's background job, its output through a process substitution: the end of
# tests/test_failures.py's frozen-rank job.


def _assert_nothing_left(processes: set[int], shm_before: set[str], watch: JobWatch) -> None:
    """No process of a job (vLLM's engines notice their rank is gone within seconds) and nothing new in /dev/shm
    of the job's own (JobWatch: other jobs may run meanwhile)."""
    deadline = time.time() + 30
    while alive(processes) and time.time() < deadline:
        time.sleep(1)
    assert not alive(processes), {pid: open(f"/proc/{pid}/cmdline", "rb").read()[:120] for pid in alive(processes)}
    assert not watch.left(shm_before), watch.left(shm_before)
