"""The fully asynchronous rollout (async_mode): one rollout rank's engine generates without a break across steps.

The rank keeps a steady number of prompts' groups in flight (async_groups_in_flight); a group finished and scored
goes to a ready queue, and a step takes its share of ready groups, oldest first, as soon as they are there. vLLM's
engine core runs in its own process, so it goes on generating while this rank takes part in the step's collectives;
the rank hands its outputs on (`pump`) whenever it waits for the others.

A weight update reaches the engine between two of its steps (`pause_for_update` / `updated`): the requests in
flight stay where they are and go on with the new weights, their KV cache kept (async_kv_cache keep, PipelineRL's
way) or recomputed by the new weights (recompute, AReaL's). Every sampled token records the version of the weights
that sampled it (Sample.versions: the number of updates the engine had loaded) beside vLLM's logprob of it, so the
loss's importance weights (tis_cap) correct each token for its own lag.

Bounded staleness: a token of version v is trained at step t only if t - v <= max_staleness. A group that can no
longer meet the bound (its first token is too old for the next step) is dropped, in flight or ready, and counted
(async/dropped_stale); its prompt is not tried again.

The groups are numbered by their place in the stream of this engine's prompts (position p is the p % share-th prompt
of what step p // share would be in the synchronous mode), so a checkpoint can record which groups were trained,
dropped, and still owed (in flight or ready): a resumed run feeds the owed ones first, and no group is trained
twice or lost.
"""
from __future__ import annotations

import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from tgrpo.batch import Sample
from tgrpo.rollout import tools
from tgrpo.search_protocol import EMPTY_QUERY, SEARCH_CLOSE


@dataclass
class _Seq:
    """One sample being generated: its episode so far (one turn in single-turn runs) and its request in flight."""
    episode: tools.Episode
    rid: str | None = None
    first: int = 0  # the version of the request's first token (before it has any: the version it will start at)
    marks: list = field(default_factory=list)  # (tokens sampled before an update, the version after it)
    seed: int | None = None


@dataclass
class _Group:
    position: int
    prompt: object  # data.Prompt
    seqs: list[_Seq]
    submitted: float  # perf_counter() when it went in
    first_version: int  # the version of its oldest token (before any: the version it was submitted at)
    running: int = 0  # requests in flight
    futures: dict | None = None  # the scorer's futures of its local rewards
    samples: list[Sample] | None = None
    media: tuple = ()  # the worker's media(prompt): the engine's ids, the images, their pixels (vision-language)


class GroupStream:
    def __init__(self, worker, cfg, version: int, state: dict | None):
        self.worker, self.cfg = worker, cfg
        self.engine = worker.engine
        self.share = cfg.prompts_per_step // worker.num_engines
        self.target = worker.groups_in_flight()
        self.version = version  # updates the engine has loaded: the step the next batch is trained at
        self.takes = 0  # steps taken since this run started (at version `version`)
        self.taken_now = 0  # groups taken by the take() under way
        self.start_version = version
        self.recompute = cfg.async_kv_cache == "recompute"
        state = state or {}
        # a run resumed from a synchronous checkpoint goes on with the prompts the next step would have had
        self.next_position = state.get("next", version * self.share)
        self.owed: deque[int] = deque(state.get("pending", []))  # fed before a restart, never trained: fed first
        self.dropped: list[int] = list(state.get("dropped", []))
        self.groups: dict[int, _Group] = {}  # fed and not yet taken: in flight, being scored or ready
        self.ready: deque[_Group] = deque()
        self.calling: list[tuple[_Group, _Seq, str]] = []  # turns that ended in a search, to answer (multi-turn)
        self.counts = Counter()  # this step's: dropped_stale, dropped_flat, searches, search_failures
        self.busy_since = time.perf_counter()  # engine occupancy: time with requests in flight and not paused
        self.busy_s = self.idle_s = 0.0
        self.seq_samples: list[int] = []
        self.scored = Counter(reward_s=0.0, remote_failures=0)  # scoring since the last take, wherever it ran

    # --- feeding and collecting -----------------------------------------------------------------------------------

    def state(self) -> dict:
        """What a checkpoint records for this engine: the next position, the groups owed and those dropped."""
        pending = sorted(set(self.groups) | set(self.owed))
        return {"index": self.worker.index, "next": self.next_position, "pending": pending, "dropped": self.dropped}

    def _prompt(self, position: int):
        step, j = divmod(position, self.share)
        return self.worker.step_prompts(step)[j]

    def _room(self) -> int:
        """Groups that may be fed now: up to the target in flight, and (AReaL's bound) no more than the next
        max_staleness + 1 steps will take, counting this one's if not yet taken, so that a group fed now is trained
        at most max_staleness updates later (if none is dropped)."""
        ahead = self.version - self.start_version - self.takes + self.cfg.max_staleness + 1  # steps not taken yet
        return min(self.target, ahead * self.share) - len(self.groups) - self.taken_now

    def _feed(self) -> None:
        while self._room() > 0:
            if self.owed:
                position = self.owed.popleft()
            else:
                position, self.next_position = self.next_position, self.next_position + 1
            prompt = self._prompt(position)
            rng = random.Random(f"{self.cfg.seed}-async-{self.worker.index}-{position}")
            group = _Group(position, prompt, [], time.perf_counter(), self.version, media=self.worker.media(prompt))
            for _ in range(self.cfg.num_generations):
                seq = _Seq(tools.Episode(prompt.prompt_ids, 0), seed=rng.randrange(2**30))
                group.seqs.append(seq)
                self._submit(group, seq)
            self.groups[position] = group

    def _submit(self, group: _Group, seq: _Seq) -> None:
        cfg, ep = self.cfg, seq.episode
        multi = self.worker.retriever is not None
        budget = (cfg.max_completion_length if multi else self.worker.completion_budget(group.prompt)) - len(ep.ids)
        seq.first, seq.marks = self.version, []
        engine_ids, images, _ = group.media
        seq.rid = self.engine.submit(
            engine_ids + ep.ids, images=images, max_tokens=budget, temperature=cfg.temperature, top_p=cfg.top_p,
            seed=None if seq.seed is None else seq.seed + ep.turns, stop=[SEARCH_CLOSE] if multi else None,
            ignore_eos=self.worker.ignore_eos, on_finish=lambda out: self._turn_done(group, seq, out))
        group.running += 1

    def _turn_done(self, group: _Group, seq: _Seq, out) -> None:
        """A request finished: its tokens' versions from the marks of the updates it lived through; then the
        episode's next turn (after its search), or the group scored once all its samples are done."""
        versions, marks, version = [], list(seq.marks), seq.first
        for i in range(len(out.token_ids)):
            while marks and marks[0][0] <= i:
                version = marks.pop(0)[1]
            versions.append(version)
        seq.rid = None
        group.running -= 1
        multi = self.worker.retriever is not None
        ep = seq.episode
        if multi:
            query = ep.add_turn(out, self.cfg.max_completion_length, ep.turns + 1 >= self.cfg.max_turns, versions)
            if query is not None:
                self.calling.append((group, seq, query))
                return
        else:
            ep.add_turn(out, self.cfg.max_completion_length, True, versions)
            ep.finish = "length" if out.finish_reason == "length" else "stop"  # vLLM's word, as synchronously
        if group.running == 0 and not any(c[0] is group for c in self.calling):
            self._score(group)

    def _answer_searches(self) -> None:
        """The searches of the turns that just ended, in one call to the retriever; their episodes go on."""
        if not self.calling:
            return
        calling, self.calling = self.calling, []
        asked = [(g, s, q) for g, s, q in calling if q]
        retriever = self.worker.retriever
        before = retriever.failures
        results = retriever.search([q for *_, q in asked]) if asked else []
        self.counts["searches"] += len(asked)
        self.counts["search_failures"] += retriever.failures - before
        found = dict(zip((id(s) for _, s, _ in asked), results))
        for group, seq, _ in calling:
            seq.episode.add_reply(found.get(id(seq), [EMPTY_QUERY]), self.worker.tokenizer,
                                  self.cfg.max_tool_response_length, self.cfg.max_completion_length, self.version)
        for group, seq, _ in calling:
            if not seq.episode.finish and group.position in self.groups:
                self._submit(group, seq)
        for group in {id(g): g for g, _, _ in calling}.values():
            if group.position in self.groups and group.running == 0 and group.samples is None:
                self._score(group)

    def _score(self, group: _Group) -> None:
        p, multi = group.prompt, self.worker.retriever is not None
        samples = []
        for seq in group.seqs:
            ep = seq.episode
            samples.append(Sample(p.prompt_ids, ep.ids, ep.logprobs, truncated=ep.truncated,
                                  completion_mask=ep.mask if multi else None, answer=p.answer,
                                  prompt_text=p.prompt_text, completion_text=ep.text,
                                  segments=ep.segments if multi else None, turns=ep.turns,
                                  tool_calls=ep.tool_calls, versions=ep.versions,
                                  group=(self.worker.index, group.position), images=group.media[2],
                                  prompt=p.prompt, columns=p.columns))
        group.samples = samples
        group.first_version = min((v for s in samples for v, m in zip(s.versions, s.model_mask) if m),
                                  default=self.version)
        group.futures = self.worker.scorer.submit([s.completion_text for s in samples], [s.answer for s in samples],
                                                  self.worker.rows(samples, [p] * len(samples)))
        if self.worker.finished_group is not None:  # rewards from models: judged as it comes, not when taken
            self.worker.finished_group(samples)

    def _collect_scored(self) -> None:
        for group in [g for g in self.groups.values() if g.futures is not None]:
            if not all(f.done() for fs in group.futures.values() for f in fs):
                continue
            part = self.worker.score(group.samples, [group.futures])
            self.scored["reward_s"] += part["reward_s"]
            self.scored["remote_failures"] += part["remote_failures"]
            group.futures = None
            flat = len({s.reward for s in group.samples}) == 1
            if self.cfg.dynamic_sampling and flat and self.counts["dropped_flat"] < self._flat_allowed():
                self.counts["dropped_flat"] += 1
                self._drop(group)
            else:
                self.ready.append(group)

    def _flat_allowed(self) -> int:
        """Dynamic sampling: groups with equal rewards set aside per step before they are trained after all (the
        synchronous mode's max_sampling_rounds extra rounds of a share each)."""
        return (self.cfg.max_sampling_rounds - 1) * self.share

    def _drop(self, group: _Group) -> None:
        self.groups.pop(group.position, None)
        self.engine.abort([s.rid for s in group.seqs if s.rid is not None])
        for s in group.seqs:
            s.rid = None
        self.calling = [c for c in self.calling if c[0] is not group]
        self.dropped.append(group.position)

    def pump(self, wait: bool) -> None:
        """One round: feed up to the target, hand vLLM's finished requests on (wait: block for the next engine
        step's), answer searches, collect scored groups."""
        self._feed()
        now = time.perf_counter()
        running = self.engine.in_flight()
        self.seq_samples.append(running)
        if running:
            self.busy_s += now - self.busy_since
        else:
            self.idle_s += now - self.busy_since
        self.busy_since = now
        if wait and running:
            self.engine.pump(wait=True)
        else:
            self.engine.pump(wait=False)
            if wait:
                time.sleep(0.005)  # nothing in flight: the others' work is what is waited for
        self._answer_searches()
        self._collect_scored()

    def take(self, step: int) -> tuple[list[Sample], dict]:
        """This engine's share of the step's groups: the oldest ready ones whose tokens are within max_staleness of
        `step`, waiting (generating) until there are enough."""
        t0 = time.perf_counter()
        taken: list[_Group] = []
        while len(taken) < self.share:
            if len(self.ready) > 1:  # the oldest first (in finishing order among equals): fewer become too old
                self.ready = deque(sorted(self.ready, key=lambda g: g.first_version))
            while self.ready and len(taken) < self.share:
                group = self.ready.popleft()
                if step - group.first_version > self.cfg.max_staleness:
                    self.counts["dropped_stale"] += 1
                    self._drop(group)
                    continue
                self.groups.pop(group.position, None)
                taken.append(group)
                self.taken_now += 1
            if len(taken) < self.share:
                self.pump(wait=True)
        self.takes, self.taken_now = self.takes + 1, 0
        self._feed()  # the taken groups' places go back into flight at once, as far as max_staleness allows
        now = time.perf_counter()
        samples = [s for g in taken for s in g.samples]
        seqs = self.seq_samples or [self.engine.in_flight()]
        busy = self.busy_s / max(1e-9, self.busy_s + self.idle_s)
        metrics = {"generate_s": now - t0, "reward_s": self.scored["reward_s"],
                   "remote_failures": self.scored["remote_failures"], "rounds": 1,
                   "generated_tokens": sum(s.model_tokens for s in samples),
                   "groups_dropped": self.counts["dropped_flat"], "tool_s": 0.0,
                   "searches": self.counts["searches"], "search_failures": self.counts["search_failures"],
                   "async/dropped_stale": self.counts["dropped_stale"],
                   "async/groups_in_flight": sum(1 for g in self.groups.values() if g.samples is None),
                   "async/groups_ready": len(self.ready),
                   "async/seqs_in_flight_mean": sum(seqs) / len(seqs),
                   "async/engine_busy_frac": busy,
                   "async/engine_paused_s": self.engine.paused_s,
                   "async/time_to_train_s": sum(now - g.submitted for g in taken) / len(taken)}
        if self.engine.on_gpu:
            metrics["device_used_gib"] = self.engine.device_used_gib()
        self.counts.clear()
        self.scored = Counter(reward_s=0.0, remote_failures=0)
        self.seq_samples = []
        self.busy_s = self.idle_s = 0.0
        self.engine.paused_s = 0.0
        return samples, metrics

    # --- in-flight weight updates ---------------------------------------------------------------------------------

    def pause_for_update(self, version: int) -> None:
        """Before the engine receives the weights of `version`: stop it between two steps and mark, in every
        request in flight, how many of its tokens the older weights sampled."""
        self.engine.pause()
        self._collect_scored()
        for group in self.groups.values():
            for seq in group.seqs:
                if seq.rid is not None:
                    seq.marks.append((self.engine.generated_so_far(seq.rid), version))

    def updated(self, version: int) -> None:
        """The engine holds `version`: go on; groups whose oldest token is now too old for the next step are
        dropped."""
        self.version = version
        for group in list(self.groups.values()):
            if group.samples is None:
                group.first_version = min((v for v in map(_first_version, group.seqs) if v is not None),
                                          default=version)
            if version - group.first_version > self.cfg.max_staleness:
                self.counts["dropped_stale"] += 1
                if group in self.ready:
                    self.ready.remove(group)
                self._drop(group)
        self.engine.resume(self.recompute)
        self.busy_since = time.perf_counter()
        self._feed()

    def close(self) -> None:
        self.engine.abort([s.rid for g in self.groups.values() for s in g.seqs if s.rid is not None])


def _first_version(seq: _Seq) -> int | None:
    """The version of a sample's first token: known once it has one; a request still without tokens at the
    latest update will start at that update's version."""
    if seq.episode.versions:
        return seq.episode.versions[0]
    if seq.rid is None:
        return None
    version = seq.first
    for count, after in seq.marks:
        if count:
            break
        version = after
    return version
