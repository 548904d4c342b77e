"""Global ranks -> roles, and every process group of the job, built here in one order on every rank.

A rank's role is decided once, from closed rank ranges in the config ("0-0", "1-2", "0,2-3"). The groups:
- data:   every rank, always gloo. Rollout batches and metrics travel here as pickled objects; it is small traffic
          and gloo keeps it off the GPU and free of NCCL's device rules.
- policy: the policy ranks. DeepSpeed ZeRO-3 partitions over this group (it becomes their default group).
- sync:   the sync source (the first policy rank) and every rollout rank. Weights are broadcast here.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from tgrpo.config import ConfigError

ROLLOUT, POLICY = "rollout", "policy"


def parse_ranges(text: str, field: str) -> list[int]:
    """'0-1,4' -> [0, 1, 4]. Closed ranges, like RLinf's placement strings."""
    ranks: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ConfigError(f"{field}='{text}' is not a rank range: write closed ranges like '0-3' or '0,2-3'") \
                from None
        if first < 0 or last < first:
            raise ConfigError(f"{field}='{text}': range '{part}' must go from a low rank up to a higher one")
        ranks.extend(range(first, last + 1))
    if len(set(ranks)) != len(ranks):
        raise ConfigError(f"{field}='{text}' names a rank twice")
    return ranks


@dataclass(frozen=True)
class Placement:
    world_size: int
    rollout: tuple[int, ...]
    policy: tuple[int, ...]

    @classmethod
    def from_config(cls, cfg, world_size: int) -> "Placement":
        rollout = parse_ranges(cfg.rollout_ranks, "rollout_ranks")
        policy = parse_ranges(cfg.policy_ranks, "policy_ranks")
        both = sorted(set(rollout) & set(policy))
        if both:
            raise ConfigError(f"ranks {both} are in both rollout_ranks='{cfg.rollout_ranks}' and policy_ranks="
                              f"'{cfg.policy_ranks}': give each rank one role")
        beyond = sorted(r for r in rollout + policy if r >= world_size)
        if beyond:
            raise ConfigError(f"ranks {beyond} are beyond the world size {world_size} (ranks 0-{world_size - 1}): "
                              "shrink the ranges or launch more processes")
        missing = sorted(set(range(world_size)) - set(rollout) - set(policy))
        if missing:
            raise ConfigError(f"ranks {missing} of the {world_size} launched have no role: cover every rank with "
                              "rollout_ranks and policy_ranks")
        if not rollout or not policy:
            raise ConfigError("rollout_ranks and policy_ranks must each name at least one rank")
        return cls(world_size, tuple(sorted(rollout)), tuple(sorted(policy)))

    @property
    def num_rollout(self) -> int:
        return len(self.rollout)

    @property
    def num_policy(self) -> int:
        return len(self.policy)

    @property
    def sync_source(self) -> int:
        return self.policy[0]

    @property
    def sync_ranks(self) -> tuple[int, ...]:
        return tuple(sorted((self.sync_source, *self.rollout)))

    def role(self, rank: int) -> str:
        return ROLLOUT if rank in self.rollout else POLICY


@dataclass
class Groups:
    data: dist.ProcessGroup
    policy: dist.ProcessGroup | None
    sync: dist.ProcessGroup | None
    sync_src: int  # the sync source's rank inside the sync group
    data_policy_src: int  # the first policy rank's rank inside the data group


def build_groups(placement: Placement, backend: str, timeout_s: int) -> Groups:
    """Every rank must call new_group for every group, in the same order, including groups it is not in."""
    timeout = timedelta(seconds=timeout_s)
    data = dist.new_group(list(range(placement.world_size)), backend="gloo", timeout=timeout)
    policy = dist.new_group(list(placement.policy), backend=backend, timeout=timeout)
    sync = dist.new_group(list(placement.sync_ranks), backend=backend, timeout=timeout)
    rank = dist.get_rank()
    return Groups(
        data=data,
        policy=policy if rank in placement.policy else None,
        sync=sync if rank in placement.sync_ranks else None,
        sync_src=placement.sync_ranks.index(placement.sync_source),
        data_policy_src=placement.sync_source,
    )
