"""A rank killed by the kernel's OOM killer is named as such in node.sh's root-cause line: the job runs in a memory
cgroup of its own with a limit, and a user reward on the rollout rank takes more than the limit."""
import os
import sys
import time

import pytest

from helpers import ROOT, JobWatch, alive, descendants, finish, free_port, shm

V1 = "/sys/fs/cgroup/memory"


def _make_cgroup(limit: int) -> str | None:
    """A memory cgroup of this test's own (v1 or v2) with the given limit; None where it cannot be made here."""
    if os.geteuid() != 0:
        return None
    for base, limit_file in ((V1, "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max")):
        if not os.path.isfile(os.path.join(base, "cgroup.procs")):
            continue
        path = os.path.join(base, f"tgrpo-oom-test-{os.getpid()}")
        try:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, limit_file), "w") as f:
                f.write(str(limit))
            return path
        except OSError:
            try:
                os.rmdir(path)
            except OSError:
                pass
    return None


@pytest.mark.slow
def test_a_rank_killed_by_the_oom_killer_is_named_so(tmp_path):
    import subprocess

    cgroup = _make_cgroup(7 << 30)
    if cgroup is None:
        pytest.skip("no memory cgroup can be made here (needs root and a writable cgroup filesystem)")
    before = shm()
    out = tmp_path / "out"
    join = lambda: open(os.path.join(cgroup, "cgroup.procs"), "w").write(str(os.getpid()))  # noqa: E731
    proc = subprocess.Popen(
        ["bash", "launch/node.sh", "0", "127.0.0.1", "--", "--output_dir", str(out), "--reward_funcs",
         "memory_hog:reward", "--reward_weights", "1.0", "--max_steps", "3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=join,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT}/tests", "MASTER_PORT": str(free_port()),
             "PYTHON": sys.executable})
    try:
        with JobWatch(proc) as watch:  # this job's own shared memory: other jobs of the suite run meanwhile
            result = finish(proc, 600)
        everything = descendants(proc.pid)
    finally:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                os.rmdir(cgroup)
                break
            except OSError:  # processes still leaving it
                time.sleep(1)
    assert result.returncode != 0
    cause = [line for line in result.stderr.splitlines() if line.startswith("error: rank 0")]
    assert cause and "was killed by the kernel's OOM killer" in cause[0], result.stderr[-3000:]
    assert not alive(everything)
    assert not watch.left(before), watch.left(before)
