"""Check a job before torchrun starts it: `tgrpo.job.checks.check_job` with the data rows and the retriever, once per
node, so that bad input stops in one line before any rank starts.

    python -m tgrpo.job.preflight WORLD_SIZE [train_grpo.py arguments]
    python -m tgrpo.job.preflight --plan WORLD_SIZE [train_grpo.py arguments]

Prints one line and exits 2 on bad input; builds the embedded tiny model if it is asked for and missing, so that
the ranks do not race to build it. Its last line, `output_dir=...`, is read by launch/node.sh. With --plan it prints
the job's memory plan on this machine instead: each part's bytes and one JSON line.
"""
import os
import sys

from tgrpo.config import load_config
from tgrpo.errors import ConfigError
from tgrpo.job.checks import check_job
from tgrpo.job.rank_life import env_local_world_size


def main() -> None:
    args = sys.argv[1:]
    plan = args[:1] == ["--plan"]
    try:
        world_size = int(args[plan])
    except (IndexError, ValueError):
        sys.exit("usage: python -m tgrpo.job.preflight [--plan] WORLD_SIZE [train_grpo.py arguments]")
    try:
        cfg = load_config(args[plan + 1:])
        if plan:
            return print_plan(cfg, world_size)
        check_job(cfg, world_size, env_local_world_size())  # node.sh gives this node's processes
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"output_dir={os.path.abspath(cfg.output_dir)}")


def print_plan(cfg, world_size: int) -> None:
    import json

    from tgrpo.job.checks import memory_plan
    from tgrpo.job.memory import GiB
    from tgrpo.job.placement import Placement

    placement = Placement.from_config(cfg, world_size, env_local_world_size())
    planned = memory_plan(cfg, placement, env_local_world_size())
    if planned is None:
        sys.exit(f"error: no memory plan for '{cfg.model}': transformers cannot build its architecture here")
    plan, gpu_total, host_total, host_free = planned
    for title, parts in (("busiest GPU", plan.gpu), ("a policy rank's training peak", plan.training),
                         ("this host", plan.host)):
        if parts:
            print(f"{title}: {sum(parts.values()) / GiB:.1f} GiB (" + ", ".join(
                f"{name} {value / GiB:.1f}" for name, value in sorted(parts.items(), key=lambda kv: -kv[1])) + ")")
    print(json.dumps({"zero_stage": placement.zero_stage, "gpu_gib": plan.gpu_total / GiB,
                      "training_gib": sum(plan.training.values()) / GiB, "host_gib": plan.host_total / GiB,
                      "gpu_total_gib": (gpu_total or 0) / GiB, "host_total_gib": host_total / GiB,
                      "host_available_gib": host_free / GiB}))


if __name__ == "__main__":
    main()
