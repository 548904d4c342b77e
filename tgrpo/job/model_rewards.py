"""Rewards from models within a step: who holds the reward models and the judge, how a finished group reaches its
holder while the engines still generate, and how the scores reach every rank.

Each prompt's group has one holder per kind (the reward models; the judge): the rank that generated it if that rank
holds the kind (colocated), else the holders' (position % their number)-th. A holder scores on a thread of its own
(tgrpo.reward.service) as groups come:
- reward_ranks and judge_ranks (ranks of their own): a rollout rank sends each group the moment its completions are
  finished, point to point over a gloo group of every rank (Channel); in async_mode as the stream finishes it, so
  groups are judged as they come, before any step takes them;
- a colocated rank (engine and policy on one GPU) with the reward models: its own groups, while its engine generates
  the rest, the models on the GPU meanwhile;
- policy ranks of a split placement: after the step's samples are gathered (they train, or wait for the gather).
Streaming follows score_while_generating (on by default with GPU engines, off with vLLM's CPU backend); without it
every holder scores its groups after the gather.
After the gather every holder takes the scores of the groups it holds (waiting for any still being scored), the
scores are gathered to every rank, and every rank adds the weighted (normalised) scores to each sample's reward
alike, before advantages."""
from __future__ import annotations

import math
import pickle
import threading
import time

import torch
import torch.distributed as dist

from tgrpo import reward_spec as reward
from tgrpo.job import rank_life
from tgrpo.job.placement import JUDGE, POLICY, REWARD
from tgrpo.reward.model import RunningNorm
from tgrpo.reward.service import Group, ScoringService

MODELS = "models"  # the holders' kinds: the reward models (held together), and the judge
_SIZE, _DATA = 37, 38  # the channel's tags


class Channel:
    """Finished groups from the rollout ranks to the reward and judge ranks, point to point over a gloo group of
    every rank (sends do not block the engine's loop; a holder's thread receives). A sender's None at the end of the
    run tells its holders it is done."""

    def __init__(self, group, rank: int, senders: list[int], receivers: list[int]):
        self.group, self.rank, self.senders, self.receivers = group, rank, senders, receivers
        self.pending: list = []  # (work, tensor) of sends in flight: the tensors live until sent
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def send(self, dst: int, obj) -> None:
        data = pickle.dumps(obj)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        size = torch.tensor([len(data)], dtype=torch.int64)
        self.pending = [(w, t) for w, t in self.pending if not w.is_completed()]
        self.pending += [(dist.isend(size, dst, group=self.group, tag=_SIZE), size),
                         (dist.isend(payload, dst, group=self.group, tag=_DATA), payload)]

    def listen(self, deliver) -> None:
        """Receive on a thread of this rank's until every sender said it is done; deliver(obj) each group."""
        def receive() -> None:
            done = 0
            try:
                while done < len(self.senders):
                    size = torch.zeros(1, dtype=torch.int64)
                    src = dist.recv(size, group=self.group, tag=_SIZE)
                    payload = torch.empty(int(size), dtype=torch.uint8)
                    dist.recv(payload, src=src, group=self.group, tag=_DATA)
                    obj = pickle.loads(payload.numpy().tobytes())
                    if obj is None:
                        done += 1
                    else:
                        deliver(obj)
            except BaseException as e:  # the process group went down under it (the job is ending)
                self.error = e

        self.thread = threading.Thread(target=receive, name="tgrpo-reward-channel", daemon=True)
        self.thread.start()

    def check(self) -> None:
        """Raise if the receiving thread stopped on an error: the groups it would have delivered never come, so a
        step waiting for their scores fails now, not at the watchdog's limit."""
        if self.error is not None:
            raise RuntimeError(f"the reward channel stopped receiving groups: {self.error!r}") from self.error

    def close(self, timeout: float = 60.0) -> None:
        """A sender: tell every holder it is done, and see its sends through. A holder: wait for its thread."""
        if self.rank in self.senders:
            for dst in self.receivers:
                self.send(dst, None)
            for work, _ in self.pending:
                work.wait()
            self.pending = []
        if self.thread is not None:
            self.thread.join(timeout)


def holders(placement) -> dict[str, list[int]]:
    """The ranks that hold each kind this job has (entries from reward_spec)."""
    return {MODELS: list(placement.reward or placement.policy), JUDGE: list(placement.judge)}


def holder_of(key: tuple, ranks: list[int], generated_on: int) -> int:
    return generated_on if generated_on in ranks else ranks[key[1] % len(ranks)]


def streaming(cfg) -> bool:
    """Groups scored by the models as they finish, while the engines generate the rest: score_while_generating, as
    with rule rewards (unset: on with GPU engines; off with vLLM's CPU backend, where the holders' threads and
    engines would take the cores the rollout engine needs)."""
    return cfg.score_while_generating if cfg.score_while_generating is not None else torch.cuda.is_available()


class Scoring:
    """This rank's part in the rewards from models: what it holds (reward models, judge) and scores on its thread,
    what it sends (a rollout rank's finished groups), and which kinds come to it streamed."""

    def __init__(self, cfg, placement, rank: int, models: dict, judge, device: torch.device, group):
        self.cfg, self.placement, self.rank = cfg, placement, rank
        self.models, self.judge = models, judge
        entries = reward.entries(cfg)
        ranks = holders(placement)
        self.kinds = {kind: ranks[kind] for kind, present in (
            (MODELS, any(m.entry != reward.JUDGE for m in entries)),
            (JUDGE, any(m.entry == reward.JUDGE for m in entries))) if present}
        # kinds whose groups reach their holder as they finish (score_while_generating): those on ranks of their
        # own, and a colocated rank's own groups; policy ranks of a split placement score after the gather
        self.streamed = {kind for kind in self.kinds if streaming(cfg)
                         and (kind == JUDGE or placement.reward or placement.colocated)}
        self.service = None
        if models or judge is not None:
            keep = (cfg.max_staleness + 4) * cfg.prompts_per_step
            self.service = ScoringService(models, judge, device, keep)
        remote = sorted({r for kind in self.streamed for r in self.kinds[kind] if r not in placement.engine_ranks})
        self.channel = None
        if group is not None:
            self.channel = Channel(group, rank, list(placement.engine_ranks), remote)
            if rank in remote:
                self.channel.listen(self.service.submit)

    def sink(self):
        """What a rollout rank calls with each finished group's samples (their .group set), or None if nothing is
        streamed from it."""
        if self.rank not in self.placement.engine_ranks or not self.streamed:
            return None

        def finished(samples: list) -> None:
            group = _group(samples)
            sent = set()
            for kind in self.streamed:
                dst = holder_of(group.key, self.kinds[kind], self.rank)
                if dst == self.rank:
                    self.service.submit(group)
                elif dst not in sent:
                    self.channel.send(dst, group)
                sent.add(dst)

        return finished

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.service is not None:
            self.service.close()
        if self.judge is not None:
            self.judge.shutdown()


def start(cfg, placement, rank: int, device: torch.device, dtype: torch.dtype, dtype_name: str, group,
          on_engine_death=None) -> Scoring:
    """Loads what this rank holds (the reward models on reward_ranks, else on the policy ranks; the judge on
    judge_ranks) and starts its scoring thread and the channel."""
    models, judge = {}, None
    roles = placement.roles(rank)
    entries = reward.entries(cfg)
    holds_models = REWARD in roles or (POLICY in roles and not placement.reward)
    if holds_models:
        from tgrpo.reward.model import RewardModel

        for m in entries:
            if m.entry != reward.JUDGE:
                models[m.name] = RewardModel(reward.resolve(cfg, m.entry), device, dtype, cfg.reward_model_batch_tokens,
                                             cfg.reward_model_max_length, offload=POLICY in roles)
    if JUDGE in roles:
        from tgrpo.reward.judge import Judge

        judge = Judge(cfg, reward.judge_dir(cfg), dtype_name, tag=f"judge{rank}", on_engine_death=on_engine_death)
    return Scoring(cfg, placement, rank, models, judge, device, group)


def norms(cfg, state: dict | None = None) -> dict:
    """reward_model_normalize running: a RunningNorm per reward model (the judge's scores are already in [0, 1])."""
    if cfg.reward_model_normalize != "running":
        return {}
    return {m.name: RunningNorm((state or {}).get(m.name)) for m in reward.entries(cfg)
            if m.entry != reward.JUDGE}


def attach(job, samples: list, wait) -> dict:
    """Score the gathered samples with the models (the groups this rank holds: taken from its scoring thread, those
    not streamed to it submitted now), add each weighted score to their rewards (every rank alike). wait(): the
    step's barrier that keeps async engines moving while the holders compute. Returns metrics."""
    cfg, placement, scoring = job.cfg, job.placement, job.scoring
    entries = reward.entries(cfg)
    if not entries:
        return {}
    t0 = time.perf_counter()
    n = cfg.num_generations
    groups = [samples[i:i + n] for i in range(0, len(samples), n)]
    mine: dict = {}  # group index -> {name: scores}
    stats = {"judge_failures": 0, "truncated": 0, "busy_s": 0.0}
    if scoring.service is not None:
        held = []
        for j, g in enumerate(groups):
            generated_on = placement.engine_ranks[g[0].group[0]]
            kinds = [k for k, ranks in scoring.kinds.items() if holder_of(g[0].group, ranks, generated_on) == job.rank]
            if kinds:
                held.append(j)
                if not any(k in scoring.streamed for k in kinds):
                    scoring.service.submit(_group(g))
        scores, stats = scoring.service.take([groups[j][0].group for j in held],
                                             scoring.channel.check if scoring.channel is not None else None)
        scoring.service.release()
        mine = {j: scores[groups[j][0].group] for j in held}
    if cfg.async_mode:
        wait()  # the engines generate while the holders score
    everyone = rank_life.gather_objects((mine, stats), job.groups.data)
    raw = {m.name: [math.nan] * len(samples) for m in entries}
    for part, _ in everyone:
        for j, by_name in part.items():
            for name, values in by_name.items():
                raw[name][j * n:(j + 1) * n] = values
    out = {"time/model_reward_s": time.perf_counter() - t0,
           "time/model_reward_busy_s": max(s["busy_s"] for _, s in everyone),
           "reward/judge_failures": float(sum(s["judge_failures"] for _, s in everyone)),
           "reward/model_truncated": float(sum(s["truncated"] for _, s in everyone))}
    for m in entries:
        values = raw[m.name]
        if m.name in job.reward_norms:
            out[f"reward/{m.name}/raw_mean"] = sum(values) / max(1, len(values))
            values = job.reward_norms[m.name](values)
        for s, value in zip(samples, values):
            s.reward_parts[m.name] = value
            s.reward += m.weight * value
    return out


def _group(samples: list) -> Group:
    """One prompt's group as its holder scores it: the prompt as the dataset gave it (kept by the rollout ranks when
    models score), else its rendered text."""
    first = samples[0]
    return Group(first.group, first.prompt if first.prompt is not None else first.prompt_text,
                 [s.completion_text for s in samples], first.answer, first.columns)
