"""The private default-group swap that lets DeepSpeed ZeRO-3 run on the policy ranks alone, with real gloo ranks."""
from helpers import torchrun


def test_policy_group_becomes_default_and_cross_role_broadcast_works():
    result = torchrun(["tests/swap_worker.py"], nproc=3, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(line for line in result.stdout.splitlines() if line.endswith(" ok")) == \
        ["rank 0 ok", "rank 1 ok", "rank 2 ok"]
