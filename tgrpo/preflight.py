"""Check a job before torchrun starts it: `tgrpo.checks.check_job` with the data rows and the retriever, once per
node, so that bad input stops in one line before any rank starts.

    python -m tgrpo.preflight WORLD_SIZE [train_grpo.py arguments]

Prints one line and exits 2 on bad input; builds the embedded tiny model if it is asked for and missing, so that
the ranks do not race to build it. Its last line, `output_dir=...`, is read by launch/node.sh.
"""
import os
import sys

from tgrpo.checks import check_job
from tgrpo.config import load_config
from tgrpo.errors import ConfigError
from tgrpo.rank_life import env_local_world_size


def main() -> None:
    try:
        world_size = int(sys.argv[1])
    except (IndexError, ValueError):
        sys.exit("usage: python -m tgrpo.preflight WORLD_SIZE [train_grpo.py arguments]")
    try:
        cfg = load_config(sys.argv[2:])
        check_job(cfg, world_size, env_local_world_size())  # node.sh gives this node's processes
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"output_dir={os.path.abspath(cfg.output_dir)}")


if __name__ == "__main__":
    main()
