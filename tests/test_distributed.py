"""The private default-group swap that lets DeepSpeed ZeRO-3 run on the policy ranks alone, with real gloo ranks."""
import re

import pytest

from helpers import torchrun

pytestmark = pytest.mark.slow  # torchrun jobs: pytest -m "not slow" leaves them out


def test_policy_group_becomes_default_and_cross_role_broadcast_works():
    result = torchrun(["tests/swap_worker.py"], nproc=3, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    # three processes share the pipe, so lines may interleave
    assert sorted(re.findall(r"rank (\d) ok", result.stdout)) == ["0", "1", "2"], result.stdout
