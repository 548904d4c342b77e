"""Running the real job from tests: torchrun subprocesses in their own process group, killed whole on timeout."""
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check(cfg, world_size: int, local_world_size: int | None = None):
    """tgrpo.checks.check_job as every rank runs it (the data rows left to the engines), with the default
    output_dir swapped for an empty temporary one: the repo's own output/ may hold a run."""
    from tgrpo.checks import check_job

    with tempfile.TemporaryDirectory() as out:
        if cfg.output_dir == "output":
            cfg.output_dir = out
        return check_job(cfg, world_size, local_world_size, data=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict | None = None, log: str | None = None) -> subprocess.Popen:
    """Start cmd from the repo root in a process group of its own. Its output is captured for finish(), or goes to
    the file `log` when the caller polls the run meanwhile (a pipe nobody reads fills up and stalls the run)."""
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for proc; on timeout kill its whole process group (torchrun, ranks, vLLM children) and fail."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(proc.args)} did not end within {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return finish(start(cmd, env), timeout)


def torchrun(script_args: list[str], nproc: int = 3, timeout: float = 600) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), *script_args], timeout)


def descendants(pid: int) -> set[int]:
    """Live (not zombie) processes below pid. vLLM renames its processes (setproctitle), which can clobber what
    /proc/PID/environ shows, so a run's engines are found by ancestry, not by an environment tag."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def shm() -> set[str]:
    """What /dev/shm holds now that no live process uses: a weight buffer (tgrpo-<tag>-<pid>.bin) whose rank is
    gone, and any other file that no process maps or holds open (by inode: a named semaphore's creator maps it under
    a temporary name). Compare before and after a job to see what it left behind; another job running meanwhile
    has its files in use, so they do not count."""
    in_use = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                in_use.update(int(parts[4]) for parts in (line.split(None, 5) for line in f)
                              if len(parts) == 6 and parts[5].startswith("/dev/shm/"))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/shm/"):
                    in_use.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except OSError:  # a process that ended meanwhile, or one we may not read
            continue
    left = set()
    for name in os.listdir("/dev/shm"):
        owner = re.fullmatch(r"tgrpo-.+-(\d+)\.bin", name)
        if owner and os.path.exists(f"/proc/{owner.group(1)}"):
            continue
        try:
            if os.stat(f"/dev/shm/{name}").st_ino not in in_use:
                left.add(name)
        except OSError:
            continue
    return left


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.add(pid)
        except OSError:
            continue
    return out


def kill_rank_after_step(proc: subprocess.Popen, metrics_file, step: int, rank: int) -> set[int]:
    """Once the job under `proc` (node.sh or torchrun) has written `step` metrics rows, kill -9 its global rank
    `rank`. Returns every process the job had then (ranks, vLLM engines, helpers), to check none is left later."""
    deadline = time.time() + 600
    while not (os.path.exists(metrics_file) and len(open(metrics_file).read().splitlines()) >= step):
        assert proc.poll() is None and time.time() < deadline, f"the run did not reach step {step}"
        time.sleep(0.5)
    everything = descendants(proc.pid)
    ranks = [pid for pid in everything if b"train_grpo.py" in open(f"/proc/{pid}/cmdline", "rb").read()]
    victim = next(pid for pid in ranks if f"RANK={rank}".encode() in
                  open(f"/proc/{pid}/environ", "rb").read().split(b"\0"))
    os.kill(victim, signal.SIGKILL)
    return everything
