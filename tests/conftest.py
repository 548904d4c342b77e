"""Running the suite side by side: `pytest -n auto` (pytest-xdist, --dist loadgroup from pytest.ini).

- The embedded models and DeepSpeed's CPU op are built once, before any worker starts (tgrpo.tiny's build is atomic
  and locked, but a test that happens to build one waits a minute or more inside its own time limit); the op in a
  TORCH_EXTENSIONS_DIR of this checkout's own (see EXTENSIONS below).
- The tests that share one run (a module-scoped fixture; marked xdist_group) go to one worker. xdist's own
  loadgroup does this by appending @group to the node ids, which pytest 9.2's structured ids silently undo
  (pytest-xdist #1386), so the workers write their groups to a folder the scheduler here reads.
- Each worker collects the tests in the same order: the longest work first (a group counts as one piece), so that
  the workers finish together; the unit tests last, in file order, filling the gaps.
- `-n auto` is the number of cores, at most one worker per 6 GiB of memory (a job of the suite takes up to ~5).
Every test also keeps to its own ports (helpers.free_port), folders (tmp_path) and processes; the /dev/shm checks
count only the job's own files (helpers.JobWatch).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Seconds each slow test (or xdist_group, as a whole) took with two workers on the 2-core machine (tests
# that start a job; the durations of `pytest -n 2 --durations=0`). Only the order they give matters: a slow test
# not named here counts as DEFAULT_SLOW_S, a unit test as 0.
SECONDS = {
    "train": 480, "ppo": 260, "search": 130,  # the groups: a run shared by several tests
    "vl": 300,  # test_vl: configs/vl.yaml killed and resumed (196 s beside another job)
    # test_rewards_from_models (alone, one worker: 256 s for the three; doubled as for two workers)
    "rm": 200, "judge": 150, "test_reward_model_colocated_scores_while_generating_with_running_normalisation": 150,
    "test_a_judge_answer_without_a_score_is_counted_or_stops_the_run": 150,
    "test_lora_and_async_mode_train_on_image_prompts_in_sync": 120,  # each of the two (64-68 s alone)
    # test_lora (measured alone, beside another user's jobs: the group 165 s, colocated 54 s, TP 40 s; doubled as
    # for two workers)
    "lora": 330, "test_lora_colocated_with_a_reference_and_a_ppo_critic": 110,
    "test_lora_reaches_a_tensor_parallel_engine": 80,
    "test_tensor_parallel_engine_and_reference_on_its_own_rank": 220,
    "test_options_run_together_and_eval_reaches_tensorboard": 200,
    # test_async (the shared run, killed and resumed, 125 s in CI; the in-flight worker ~45 s alone, doubled)
    "async": 150,
    "test_tokens_sampled_after_an_in_flight_update_are_the_new_weights": 90,
    "test_a_rank_killed_by_the_oom_killer_is_named_so": 200,
    "test_node_sh_signals_save_or_stop_the_job_as_meant_and_the_run_resumes": 170,
    "test_overlapped_run_learns_the_toy_task_and_stays_in_sync": 160,
    "test_readme_main_job_prints_one_screen_and_logs_the_rest": 160,
    "test_accelerate_launch_trains_a_short_run": 130,
    "test_colocated_every_rank_rolls_out_and_trains": 110,
    "test_a_frozen_rank_is_named_by_the_hang_report_and_ctrl_c_stops_node_sh_run_as_a_background_job": 170,
    "test_build_locks_at_start_up_are_named_waited_for_or_removed": 70,
    "test_a_model_holding_nan_stops_after_max_nonfinite_in_a_row_steps_unsaved": 50,
    "test_trainer_started_by_srun_reads_slurm_variables": 105,
    "test_search_r1s_ppo_recipe_runs_with_the_critic_on_a_rank_of_its_own": 105,
    "test_tmux_start_runs_the_job_and_stop_ends_it": 100,
    "test_two_node_processes_train_to_completion": 100,
    "test_a_dead_vllm_engine_ends_the_job_with_one_line": 90,
    "test_a_node_that_never_joins_ends_the_job_with_a_clear_message": 40,
    "test_torchrun_bad_row_found_by_rollout_rank_ends_every_rank": 35,
    "test_check_sh_passes_with_the_hostfile_world": 30,
    "test_a_dead_retriever_stops_the_run_in_one_line_before_any_engine_starts": 20,
    "test_node_sh_names_a_master_port_in_use": 20,
    "test_plain_torchrun_says_bad_input_in_one_line": 15,
    "test_node_sh_rejects_bad_input_in_one_line": 10,
    "test_node_sh_checks_the_retriever_before_torchrun_starts": 10,
    "test_node_sh_stops_a_job_that_cannot_fit_before_any_engine": 10,
    "test_check_sh_fails_in_one_line_on_a_wrong_count": 10,
    "test_policy_group_becomes_default_and_cross_role_broadcast_works": 10,
    "test_check_sh_missing_node_ends_with_a_clear_line": 8,
    "test_check_finds_a_wrong_all_reduce_value": 8,
    "test_launch_script_starts_one_server_per_node_and_stops_it": 5,
}
DEFAULT_SLOW_S = 120
GIB_PER_WORKER = 6


def pytest_xdist_auto_num_workers(config):
    """-n auto: one worker per core, at most one per GIB_PER_WORKER of memory (PYTEST_XDIST_AUTO_NUM_WORKERS
    overrides it)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/meminfo") as f:
            total_gib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) / 2**20
    except (OSError, StopIteration):
        return cores
    return max(1, min(cores, int(total_gib // GIB_PER_WORKER)))


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


# DeepSpeed compiles its CPU communication op (deepspeed_shm_comm) on first use, under torch's file lock in
# TORCH_EXTENSIONS_DIR (~/.cache/torch_extensions by default, shared by every checkout and venv of the user). Two venvs
# there rebuild it in turn (their source paths differ; a build takes 1-4 minutes on 2 busy cores), and a build killed
# midway (a test's time limit, a stopped run) leaves the lock behind: every later job's policy ranks then wait for it
# forever. So the suite's jobs use a folder of this checkout's own, the op is built there before the tests start, and
# a lock older than any build is removed first.
EXTENSIONS = os.path.join(ROOT, ".cache", "torch_extensions")
STALE_LOCK_S = 15 * 60


def pytest_configure(config):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS)  # inherited by the workers and every job they start
    _make_groups_folder(config)


def _stale_locks() -> None:
    """Remove the locks of builds in this checkout's extensions folder that no build can still be holding."""
    folder = os.environ["TORCH_EXTENSIONS_DIR"]
    if os.path.realpath(folder) != os.path.realpath(EXTENSIONS) or not os.path.isdir(folder):
        return  # a folder the user chose: not ours to clean
    for root, _, files in os.walk(folder):
        if "lock" in files and time.time() - os.path.getmtime(os.path.join(root, "lock")) > STALE_LOCK_S:
            os.remove(os.path.join(root, "lock"))
            print(f"\nremoved a stale build lock (a build killed midway): {os.path.join(root, 'lock')}",
                  file=sys.stderr)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    """Build the embedded models and DeepSpeed's CPU op before the tests (and before xdist starts its workers), each
    in a process of its own, side by side. The op only where the run may start a job (not for -m "not slow") on a
    machine without a GPU (the op is DeepSpeed's CPU accelerator's)."""
    config = session.config
    if _is_worker(config) or config.option.collectonly:
        return
    from tgrpo.tiny import JUDGE_NAME, RM_NAME, SEARCH_NAME, TINY_NAME, VL_NAME

    _stale_locks()
    cache = os.path.join(ROOT, ".cache")
    model = "import sys; from tgrpo.tiny import ensure_model; ensure_model(sys.argv[1], sys.argv[2])"
    builds = {name: [sys.executable, "-c", model, cache, which]
              for which, name in (("tiny", TINY_NAME), ("tiny-search", SEARCH_NAME), ("tiny-vl", VL_NAME),
                                  ("tiny-rm", RM_NAME), ("tiny-judge", JUDGE_NAME))
              if not os.path.isfile(os.path.join(cache, name, "done"))}
    op = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "deepspeed_shm_comm")
    if ("not slow" not in (config.option.markexpr or "") and shutil.which("nvidia-smi") is None
            and not any(name.endswith(".so") for name in (os.listdir(op) if os.path.isdir(op) else []))):
        builds["DeepSpeed's deepspeed_shm_comm op"] = [
            sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"]
    if not builds:
        return
    started = time.time()
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name, cmd in builds.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode != 0:  # the tests that need it build it again and fail with the cause
            print(f"\nbuilding {name} failed:\n{out[-3000:]}", file=sys.stderr)
    print(f"\nbuilt {', '.join(procs)} in {time.time() - started:.0f} s", file=sys.stderr)


def _group(item) -> str | None:
    names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                    for m in item.iter_markers("xdist_group")})
    return "_".join(names) or None


def pytest_collection_modifyitems(config, items):
    """In a worker: the longest work first, a group's tests together and in their order (they share a run), ties in
    collection order; then the groups written down for the scheduler."""
    if not _is_worker(config):
        return
    units: dict[str, list] = {}
    for item in items:
        units.setdefault(_group(item) or item.nodeid, []).append(item)

    def seconds(key: str, members: list) -> float:
        if key in SECONDS:
            return SECONDS[key]
        estimates = [SECONDS.get(m.originalname, DEFAULT_SLOW_S if m.get_closest_marker("slow") else 0)
                     for m in members]
        return sum(estimates)

    order = sorted(units.items(), key=lambda kv: -seconds(*kv))  # sorted() is stable
    items[:] = [item for _, members in order for item in members]
    folder = os.environ.get(GROUPS_ENV)
    if folder and os.path.isdir(folder):
        groups = {item.nodeid: _group(item) for item in items if _group(item)}
        path = os.path.join(folder, f"{config.workerinput['workerid']}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(groups, f)
        os.replace(path + ".tmp", path)


GROUPS_ENV = "TGRPO_XDIST_GROUPS"


def _make_groups_folder(config):
    """The controller of a -n run: a folder for the workers' groups, named in the environment they inherit."""
    if _is_worker(config) or not config.getoption("numprocesses", None):
        return
    folder = tempfile.mkdtemp(prefix="tgrpo-xdist-groups-")
    os.environ[GROUPS_ENV] = folder
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup that reads the groups from the workers' files (see the module's docstring)."""
    if config.getvalue("dist") != "loadgroup" or not os.environ.get(GROUPS_ENV):
        return None
    from xdist.scheduler import LoadGroupScheduling

    folder = os.environ[GROUPS_ENV]

    class GroupScheduling(LoadGroupScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # every worker has collected (and written) by the time anything is scheduled
                names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
                self.groups = json.load(open(os.path.join(folder, names[0]))) if names else {}
            group = self.groups.get(nodeid)
            return f"group:{group}" if group else super()._split_scope(nodeid)

    return GroupScheduling(config, log)
