"""Running the real job from tests: torchrun subprocesses in their own process group, killed whole on timeout."""
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check(cfg, world_size: int, local_world_size: int | None = None):
    """tgrpo.job.checks.check_job as every rank runs it (the data rows left to the engines), with the default
    output_dir swapped for an empty temporary one: the repo's own output/ may hold a run."""
    from tgrpo.job.checks import check_job

    with tempfile.TemporaryDirectory() as out:
        if cfg.output_dir == "output":
            cfg.output_dir = out
        return check_job(cfg, world_size, local_world_size, data=False)


# Ports that tools bind by default on this machine: never handed out, whatever is running.
_DEFAULT_PORTS = {29500, 29631}  # torchrun's, node.sh's (and the trainer's) MASTER_PORT
_next_port: list[int] = []


def free_port() -> int:
    """A port nothing holds now, for a job to bind a moment later (torchrun's store, node.sh's master, a server).

    Another process could take a free port in that moment. A port the kernel picks (bind to 0) lies in its ephemeral
    range, from which every other job's outgoing connections and gloo's and vLLM's own listening sockets take theirs
    meanwhile, so ports are chosen below that range, where only an explicit bind can land. Of those, xdist worker N
    of W (PYTEST_XDIST_WORKER gwN) hands out only the ports equal to N modulo W, so two workers never choose the same
    one, in turn from a random start, so that two pytest runs on one machine rarely meet; a port in use (or in
    TIME_WAIT: the check binds without SO_REUSEADDR) is skipped."""
    low, high = 20000, _ephemeral_low()
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    worker = int(re.sub(r"\D", "", os.environ.get("PYTEST_XDIST_WORKER", "")) or 0) % workers
    slots = (high - low - worker) // workers
    if slots < 100:  # an unusual ephemeral range: leave the choice to the kernel
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    if not _next_port:
        _next_port.append(random.SystemRandom().randrange(slots))
    for _ in range(slots):
        port = low + worker + workers * (_next_port[0] % slots)
        _next_port[0] += 1
        if port in _DEFAULT_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {low}..{high} for xdist worker {worker} of {workers}")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _as_from_a_terminal() -> None:
    """In the child, before exec: the signals a user sends (Ctrl-C, kill, a scheduler's USR1) at their defaults and
    unblocked, as a shell started from a terminal has them. A pytest worker may hold SIGINT ignored (seen in the full
    suite, not alone), which the child would inherit, and bash cannot trap a signal ignored when it starts: node.sh's
    Ctrl-C handler never ran."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1})


def start(cmd: list[str], env: dict | None = None, log: str | None = None) -> subprocess.Popen:
    """Start cmd from the repo root in a process group of its own, with the signals of a terminal's shell. Its
    output is captured for finish(), or goes to the file `log` when the caller polls the run meanwhile (a pipe nobody
    reads fills up and stalls the run)."""
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_as_from_a_terminal,
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


_started: dict[int, str] = {}  # pid -> its start time, as descendants() saw it


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields from the state on (field 3 first), or None for a process that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> set[int]:
    """Live (not zombie) processes below pid. vLLM renames its processes (setproctitle), which can clobber what
    /proc/PID/environ shows, so a run's engines are found by ancestry, not by an environment tag. Each one's start
    time is kept, so that alive() never mistakes a later process that got the same pid for it."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
            starts[int(entry)] = fields[19]
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            _started[child] = starts[child]
            todo.append(child)
    return found


def _held_shm(pid: int) -> set[int]:
    """Inodes of the /dev/shm files process pid maps or holds open."""
    held = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            held.update(int(parts[4]) for parts in (line.split(None, 5) for line in f)
                        if len(parts) == 6 and parts[5].startswith("/dev/shm/"))
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/shm/"):
                    held.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
            except OSError:  # closed meanwhile
                continue
    except OSError:  # a process that ended meanwhile, or one we may not read
        pass
    return held


def shm() -> set[str]:
    """What /dev/shm holds now that no live process uses: a weight buffer (tgrpo-<tag>-<pid>.bin) whose rank is
    gone, and any other file that no process maps or holds open (by inode: a named semaphore's creator maps it under
    a temporary name). Compare before and after a job to see what it left behind; another job running meanwhile
    has its files in use, so they do not count, except between a kill and its sweep: JobWatch.left() counts only
    the job's own."""
    in_use = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            in_use |= _held_shm(int(pid))
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


class JobWatch:
    """Every process of one job and the /dev/shm files they hold, sampled every `every` s from start() to stop():
    the processes below `proc` (torchrun or node.sh: ranks, vLLM engines, helpers), and those of them that live on
    after their parent is gone. With other jobs on the machine (pytest -n, other users), a file in /dev/shm that no
    process uses may be another job's, left by a rank it killed and not yet swept; left() counts only this job's:
    the files its processes were seen holding and the weight buffers named after one of them."""

    def __init__(self, proc: subprocess.Popen, every: float = 0.5):
        self.proc, self.every = proc, every
        self.pids: set[int] = {proc.pid}
        self.inodes: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "JobWatch":
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self.sample()

    def __enter__(self) -> "JobWatch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> set[int]:
        """Look now (also called by hand, e.g. right before a kill); returns the job's live processes."""
        live = alive(self.pids) | descendants(self.proc.pid)
        for pid in live:
            self.inodes |= _held_shm(pid)
        self.pids |= live
        return live

    def left(self, before: set[str]) -> set[str]:
        """What shm() counts now that it did not count in `before` and that is this job's."""
        ours = set()
        for name in shm() - before:
            owner = re.fullmatch(r"tgrpo-.+-(\d+)\.bin", name)
            try:
                if (owner and int(owner.group(1)) in self.pids) or os.stat(f"/dev/shm/{name}").st_ino in self.inodes:
                    ours.add(name)
            except OSError:  # removed meanwhile
                continue
        return ours


def alive(pids: set[int]) -> set[int]:
    """Those of pids still running (not zombies), where a pid that descendants() saw must still have the same start
    time: a pid freed by a process that ended can be taken by another one (pid_max is 32768 here)."""
    out = set()
    for pid in pids:
        fields = _stat(pid)
        if fields and fields[0] != "Z" and _started.get(pid, fields[19]) == fields[19]:
            out.add(pid)
    return out


def _read(path: str) -> bytes:
    """A /proc file's bytes, empty for a process that ended meanwhile."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def is_rank(pid: int) -> bool:
    """A rank of the job: a process torchrun started (its parent's command line is torchrun's). Matching the command
    line alone also finds torchrun itself and the processes rank 0 forks (the reward pool's workers keep its command
    line and its RANK=0): kill -9 of one of those left the job running on, and a test waiting for the kill failed."""
    fields = _stat(pid)
    if fields is None or b"train_grpo.py" not in _read(f"/proc/{pid}/cmdline"):
        return False
    return b"torch.distributed.run" in _read(f"/proc/{fields[1]}/cmdline")


def kill_rank_after_step(proc: subprocess.Popen, metrics_file, step: int, rank: int,
                         watch: JobWatch | None = None) -> set[int]:
    """Once the job under `proc` (node.sh or torchrun) has written `step` metrics rows, kill -9 its global rank
    `rank`. Returns every process the job had then (ranks, vLLM engines, helpers), to check none is left later.
    A JobWatch of the job looks once more right before the kill."""
    deadline = time.time() + 600
    while not (os.path.exists(metrics_file) and len(open(metrics_file).read().splitlines()) >= step):
        assert proc.poll() is None and time.time() < deadline, f"the run did not reach step {step}"
        time.sleep(0.5)
    everything = watch.sample() - {proc.pid} if watch else descendants(proc.pid)
    ranks = [pid for pid in everything if is_rank(pid)]
    victim = next(pid for pid in ranks if f"RANK={rank}".encode() in _read(f"/proc/{pid}/environ").split(b"\0"))
    os.kill(victim, signal.SIGKILL)
    return everything


def killed_and_resumed_run(out, train_args: list[str], kill_steps: tuple[int, int], timeout: float = 900):
    """A job under launch/node.sh with MAX_RESTARTS=1 (train_args: train_grpo.py's, output_dir `out`), kill -9 of a
    random rank after a random step in kill_steps (past a checkpoint): node.sh starts the job again with --resume
    auto and it must finish by itself. Returns (final metrics, the whole rows the first attempt wrote before the
    kill, the console, (kill_after, victim_rank, the job's processes still alive, its /dev/shm files left))."""
    import json

    rng = random.Random()
    kill_after = rng.randint(*kill_steps)
    victim_rank = int(os.environ.get("TGRPO_TEST_VICTIM_RANK", rng.randint(0, 2)))  # to replay one case
    env = {"PYTHON": sys.executable, "MASTER_PORT": str(free_port()), "MAX_RESTARTS": "1"}
    shm_before = shm()
    proc = start(["bash", "launch/node.sh", "0", "127.0.0.1", "--", *train_args], env=env, log=str(out / "node.out"))
    with JobWatch(proc) as watch:
        metrics_file = out / "metrics.jsonl"
        everything = kill_rank_after_step(proc, metrics_file, kill_after, victim_rank, watch)
        first_attempt = [json.loads(line) for line in metrics_file.read_text().split("\n")[:-1]]  # whole lines only
        done = finish(proc, timeout)
    console = open(out / "node.out").read()
    assert done.returncode == 0, console[-4000:]
    deadline = time.time() + 30  # engine processes notice their rank is gone
    while alive(everything) and time.time() < deadline:
        time.sleep(1)
    metrics = [json.loads(line) for line in open(metrics_file)]
    return metrics, first_attempt, console, (kill_after, victim_rank, alive(everything), watch.left(shm_before))
