"""Global ranks -> roles, and every process group of the job, built here in one order on every rank.

One process per GPU (or per CPU slot). Roles come from closed rank ranges in the config ("0-3", "0,2-3", "all"):
- rollout:   ranks whose GPUs hold vLLM engines. With rollout_tensor_parallel_size = k, each engine spans k
             consecutive rollout ranks of one node; the first drives the engine, the other k-1 lend it their GPU.
- policy:    ranks that train with DeepSpeed ZeRO-3.
- reference: ranks of their own holding the frozen reference (ZeRO-3 over them); empty puts it on the policy ranks.
- critic:    (advantage_estimator gae) ranks of their own training the critic; empty puts it on the policy ranks.
             Critic ranks never receive weights from the sync.
- reward:    ranks of their own holding the reward models of reward_funcs (a whole copy each, scoring a share of
             the batch); empty puts them on the policy ranks.
- judge:     ranks of their own, each driving a frozen vLLM engine of judge_model (reward 'judge').
Split placement gives every rank one role. Colocated placement (colocate: true) gives every rank both rollout and
policy: each trains a ZeRO-3 shard and drives (or lends its GPU to) an engine that sleeps while the policy trains.

The groups:
- data:      every rank, always gloo. Samples and metrics travel here as pickled objects: small traffic that gloo
             keeps off the GPU and free of NCCL's device rules.
- policy:    the policy ranks; ZeRO-3 partitions over it (it becomes their default group).
- reference: the reference ranks, when they are ranks of their own (likewise their default group).
- critic:    the critic ranks, when they are ranks of their own (likewise).
- sync:      split placement, sync_mode partitions (default): one group per policy rank, holding it and every
             engine-driving rank; each policy rank broadcasts its ZeRO-3 shards there (see sync.py).
             sync_mode gather: one group per sender. With sync_senders = 1, the first policy rank and every
             engine-driving rank (one broadcast reaches every engine); with k senders, policy rank j and every k-th
             engine from the j-th (after ZeRO-3's gather every policy rank holds each bucket, so k broadcasts run
             side by side on different links). Colocated ranks load what they gather and need no sync group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from tgrpo.errors import ConfigError

ROLLOUT, POLICY, REFERENCE, CRITIC = "rollout", "policy", "reference", "critic"
REWARD, JUDGE = "reward", "judge"
REWARDS_TIMEOUT_S = 7 * 24 * 3600


def parse_ranges(text: str, field: str, world_size: int | None = None) -> list[int]:
    """'0-1,4' -> [0, 1, 4]; 'all' -> every rank; '' -> none. Closed ranges, like RLinf's placement strings."""
    text = str(text).replace(" ", "")
    if text == "":
        return []
    if text == "all" and world_size is not None:
        return list(range(world_size))
    ranks: list[int] = []
    for part in text.split(","):
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
    reference: tuple[int, ...] = ()
    tensor_parallel: int = 1
    colocated: bool = False
    senders: int = 1
    sync_mode: str = "partitions"
    critic: tuple[int, ...] = ()
    zero_stage: int = 3  # the policy's (and critic's) ZeRO stage, zero_stage auto resolved
    zero_stage_auto: bool = False
    reward: tuple[int, ...] = ()
    judge: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, cfg, world_size: int, local_world_size: int | None = None) -> "Placement":
        rollout = parse_ranges(cfg.rollout_ranks, "rollout_ranks", world_size)
        policy = parse_ranges(cfg.policy_ranks, "policy_ranks", world_size)
        reference = parse_ranges(cfg.reference_ranks, "reference_ranks", world_size)
        critic = parse_ranges(cfg.critic_ranks, "critic_ranks", world_size)
        reward = parse_ranges(cfg.reward_ranks, "reward_ranks", world_size)
        judge = parse_ranges(cfg.judge_ranks, "judge_ranks", world_size)
        tp = cfg.rollout_tensor_parallel_size
        if not rollout or not policy:
            raise ConfigError("rollout_ranks and policy_ranks must each name at least one rank")
        beyond = sorted(r for r in rollout + policy + reference + critic + reward + judge if r >= world_size)
        if beyond:
            raise ConfigError(f"ranks {beyond} are beyond the world size {world_size} (ranks 0-{world_size - 1}): "
                              "shrink the ranges or launch more processes")
        if cfg.colocate:
            if sorted(rollout) != sorted(policy):
                raise ConfigError(f"colocate=true puts rollout and policy on the same ranks, but rollout_ranks="
                                  f"'{cfg.rollout_ranks}' and policy_ranks='{cfg.policy_ranks}' differ: set both "
                                  "to 'all'")
        else:
            both = sorted(set(rollout) & set(policy))
            if both:
                raise ConfigError(f"ranks {both} are in both rollout_ranks='{cfg.rollout_ranks}' and policy_ranks="
                                  f"'{cfg.policy_ranks}': give each rank one role, or set colocate=true")
        twice = sorted(set(reference) & (set(rollout) | set(policy)))
        if twice:
            raise ConfigError(f"ranks {twice} are in reference_ranks='{cfg.reference_ranks}' and in another role: "
                              "reference ranks hold the reference model alone")
        twice = sorted(set(critic) & (set(rollout) | set(policy) | set(reference)))
        if twice:
            raise ConfigError(f"ranks {twice} are in critic_ranks='{cfg.critic_ranks}' and in another role: critic "
                              "ranks hold the critic alone")
        for name, own, text in (("reward_ranks", reward, cfg.reward_ranks), ("judge_ranks", judge, cfg.judge_ranks)):
            others = set(rollout) | set(policy) | set(reference) | set(critic) | (set(judge) if own is reward else
                                                                                    set(reward))
            twice = sorted(set(own) & others)
            if twice:
                raise ConfigError(f"ranks {twice} are in {name}='{text}' and in another role: {name} hold "
                                  f"{'the reward models' if own is reward else 'the judge'} alone")
        if reference and cfg.beta == 0:
            raise ConfigError("reference_ranks are given but beta=0 loads no reference model: set beta > 0 or "
                              "leave reference_ranks empty")
        missing = sorted(set(range(world_size)) - set(rollout) - set(policy) - set(reference) - set(critic)
                         - set(reward) - set(judge))
        if missing:
            raise ConfigError(f"ranks {missing} of the {world_size} launched have no role: cover every rank with "
                              "rollout_ranks, policy_ranks, reference_ranks, critic_ranks, reward_ranks and "
                              "judge_ranks")
        rollout = sorted(rollout)
        if len(rollout) % tp:
            raise ConfigError(f"{len(rollout)} rollout ranks do not split into engines of "
                              f"rollout_tensor_parallel_size={tp} GPUs each")
        node = local_world_size or world_size
        for first in rollout[::tp]:
            block = list(range(first, first + tp))
            if rollout[rollout.index(first):rollout.index(first) + tp] != block:
                raise ConfigError(f"an engine of {tp} GPUs needs {tp} consecutive rollout ranks, but rollout_ranks="
                                  f"'{cfg.rollout_ranks}' breaks at rank {first}")
            if first // node != block[-1] // node:
                raise ConfigError(f"the engine on ranks {first}-{block[-1]} crosses a node boundary ({node} "
                                  "processes per node): an engine's GPUs must be on one node")
        senders = min(cfg.sync_senders, len(policy), len(rollout) // tp)
        stage = cfg.zero_stage
        if stage == "auto":
            # one rank holds every parameter whole whatever the stage, and ZeRO-2 trains it fastest; several ranks
            # shard it (the design's ZeRO-3 policy groups), and partitions sends ZeRO-3 shards
            split_partitions = cfg.sync_mode == "partitions" and not cfg.colocate
            stage = 3 if len(policy) > 1 or split_partitions else 2
        mode = cfg.sync_mode if cfg.sync_mode != "auto" else ("partitions" if stage == 3 else "gather")
        return cls(world_size, tuple(rollout), tuple(sorted(policy)), tuple(sorted(reference)), tp,
                   bool(cfg.colocate), senders, mode, tuple(sorted(critic)), stage, cfg.zero_stage == "auto",
                   tuple(sorted(reward)), tuple(sorted(judge)))

    @property
    def engine_ranks(self) -> tuple[int, ...]:
        """The ranks that drive an engine: the first of each tensor-parallel block."""
        return self.rollout[::self.tensor_parallel]

    @property
    def num_engines(self) -> int:
        return len(self.engine_ranks)

    @property
    def num_policy(self) -> int:
        return len(self.policy)

    @property
    def sync_source(self) -> int:
        return self.policy[0]

    def sync_sets(self, senders: int | None = None) -> list[tuple[int, ...]]:
        """The ranks of each sync group: sender j (the j-th policy rank) and every senders-th engine from the j-th.
        The sender is the first rank of its set."""
        k = senders or self.senders
        return [(self.policy[j], *self.engine_ranks[j::k]) for j in range(k)]

    def roles(self, rank: int) -> set[str]:
        return {role for role, ranks in ((ROLLOUT, self.rollout), (POLICY, self.policy), (REFERENCE, self.reference),
                                         (CRITIC, self.critic), (REWARD, self.reward), (JUDGE, self.judge))
                if rank in ranks}

    def role_name(self, rank: int) -> str:
        """For messages: 'rollout', 'policy', 'rollout+policy', ..."""
        return "+".join(r for r in (ROLLOUT, POLICY, REFERENCE, CRITIC, REWARD, JUDGE) if r in self.roles(rank))


@dataclass
class Groups:
    data: dist.ProcessGroup
    policy: dist.ProcessGroup | None
    reference: dist.ProcessGroup | None
    sync: dist.ProcessGroup | None  # this rank's sync group (split placement, sender or engine rank)
    sync_src: int = 0  # the sender's rank inside it
    is_sender: bool = False
    # sync_mode partitions: (group, the policy rank's index in it) for each policy rank's group this rank is in:
    # all of them on an engine rank, its own on a policy rank, none elsewhere
    parts: list = field(default_factory=list)
    critic: dist.ProcessGroup | None = None  # the critic ranks', when they are ranks of their own
    # every rank's gloo group in which finished groups travel to reward and judge ranks of their own (a holder's
    # thread waits in it across whole steps, so its timeout is long: the job's watchdog watches for hangs)
    rewards: dist.ProcessGroup | None = None


def build_partition_groups(placement: Placement, backend: str, timeout_s: int) -> list[tuple]:
    """One group per policy rank with every engine-driving rank; every rank calls this in the same order."""
    rank = dist.get_rank()
    mine = []
    for sender in placement.policy:
        ranks = sorted({sender, *placement.engine_ranks})
        group = dist.new_group(ranks, backend=backend, timeout=timedelta(seconds=timeout_s))
        if rank == sender or rank in placement.engine_ranks:
            mine.append((group, ranks.index(sender)))
    return mine


def build_sync_groups(placement: Placement, senders: int, backend: str, timeout_s: int):
    """(group, sender's index in it, is this rank the sender) for this rank; (None, 0, False) if it is in none.
    Every rank must call this, in the same order, for the same senders."""
    rank = dist.get_rank()
    mine = (None, 0, False)
    for ranks in placement.sync_sets(senders):
        group = dist.new_group(sorted(ranks), backend=backend, timeout=timedelta(seconds=timeout_s))
        if rank in ranks:
            mine = (group, sorted(ranks).index(ranks[0]), rank == ranks[0])
    return mine


def build_groups(placement: Placement, backend: str, timeout_s: int) -> Groups:
    """Every rank must call new_group for every group, in the same order, including groups it is not in. Each
    group gets the timeout explicitly: sub-groups do not all inherit init_process_group's."""
    timeout = timedelta(seconds=timeout_s)
    rank = dist.get_rank()
    data = dist.new_group(list(range(placement.world_size)), backend="gloo", timeout=timeout)
    policy = dist.new_group(list(placement.policy), backend=backend, timeout=timeout)
    reference = (dist.new_group(list(placement.reference), backend=backend, timeout=timeout)
                 if placement.reference else None)
    critic = dist.new_group(list(placement.critic), backend=backend, timeout=timeout) if placement.critic else None
    rewards = (dist.new_group(list(range(placement.world_size)), backend="gloo",
                              timeout=timedelta(seconds=max(timeout_s, REWARDS_TIMEOUT_S)))
               if placement.reward or placement.judge else None)
    sync, sync_src, is_sender, parts = None, 0, False, []
    if not placement.colocated and placement.sync_mode == "gather":
        sync, sync_src, is_sender = build_sync_groups(placement, placement.senders, backend, timeout_s)
    elif not placement.colocated:
        parts = build_partition_groups(placement, backend, timeout_s)
    return Groups(
        data=data,
        policy=policy if rank in placement.policy else None,
        reference=reference if rank in placement.reference else None,
        sync=sync, sync_src=sync_src, is_sender=is_sender, parts=parts,
        critic=critic if rank in placement.critic else None,
        rewards=rewards,
    )
