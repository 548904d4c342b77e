"""The scoring thread of a rank that holds reward models or the judge: groups of finished completions come in as
they finish (from this rank's own engine, or from the rollout ranks through the job's channel) and are scored in a
thread of their own while generation goes on; each call scores everything that has come since the last one, so the
reward model's token-budget batches and the judge's vLLM batch span several groups. The step then takes the scores
of its groups (waiting for any still being scored) by their keys, (engine index, position in its stream).

On a GPU the reward models run on a CUDA stream of their own, beside the engine's process and the main thread."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch

from tgrpo.reward_spec import JUDGE


@dataclass
class Group:
    """What scoring needs of one prompt's group: the prompt as the dataset gave it (messages or text), the
    completions' texts, the reference answer and the row's other columns (judge templates)."""
    key: tuple
    prompt: object
    completions: list[str]
    answer: str
    columns: dict | None


class ScoringService:
    def __init__(self, models: dict, judge, device: torch.device, keep: int):
        """keep: the most groups' scores held for later steps (async_mode drops a group as too stale after it was
        scored; its scores go, oldest first, once more than this many wait)."""
        self.models, self.judge, self.keep = models, judge, keep
        self.inbox: queue.Queue = queue.Queue()
        self.done = threading.Condition()
        # key -> ({reward name: a score per completion}, {"judge_failures": n, "truncated": n} of the group)
        self.scores: dict[tuple, tuple[dict[str, list[float]], dict]] = {}
        self.error: BaseException | None = None
        self.busy_s = 0.0  # seconds the thread scored since the last take
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and models else None
        self.thread = threading.Thread(target=self._serve, name="tgrpo-model-rewards", daemon=True)
        self.thread.start()

    def submit(self, group: Group) -> None:
        self.inbox.put(group)

    def _serve(self) -> None:
        while True:
            first = self.inbox.get()
            if first is None:
                return
            groups, stop = [first], False
            while True:  # everything that came meanwhile, scored as one batch
                try:
                    more = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                groups.append(more)
            try:
                scored = self._score(groups)
            except BaseException as e:  # the step that waits for these scores raises it
                with self.done:
                    self.error = e
                    self.done.notify_all()
                return
            with self.done:
                self.scores.update(scored)
                self.done.notify_all()
            if stop:
                return

    def _score(self, groups: list[Group]) -> dict:
        t0 = time.perf_counter()
        prompts = [g.prompt for g in groups for _ in g.completions]
        completions = [c for g in groups for c in g.completions]
        values: dict[str, list[float]] = {}
        truncated = [False] * len(completions)
        failed = [False] * len(completions)
        for name, model in self.models.items():
            if self.stream is not None:
                with torch.cuda.stream(self.stream):
                    values[name] = model.score(prompts, completions)
            else:
                values[name] = model.score(prompts, completions)
            truncated = [a or b for a, b in zip(truncated, model.last_truncated)]
        if self.judge is not None:
            values[JUDGE], failed = self.judge.score(
                prompts, completions, [g.answer for g in groups for _ in g.completions],
                [g.columns for g in groups for _ in g.completions])
        self.busy_s += time.perf_counter() - t0
        out, start = {}, 0
        for g in groups:
            end = start + len(g.completions)
            out[g.key] = ({name: v[start:end] for name, v in values.items()},
                          {"judge_failures": sum(failed[start:end]), "truncated": sum(truncated[start:end])})
            start = end
        return out

    def take(self, keys: list[tuple], check=None) -> tuple[dict[tuple, dict[str, list[float]]], dict]:
        """The scores of these groups (every one submitted), waiting for those not scored yet, and their counts
        (judge failures, inputs truncated) with the seconds the thread scored since the last take. A scoring error
        is raised here, and whatever check() raises while it waits (what feeds the thread has stopped)."""
        with self.done:
            while not all(k in self.scores for k in keys):
                if self.error is not None:
                    raise self.error
                if not self.thread.is_alive():
                    raise RuntimeError("the reward-model scoring thread stopped")
                if check is not None:
                    check()
                self.done.wait(timeout=1.0)
            if self.error is not None:
                raise self.error
            taken = [self.scores.pop(k) for k in keys]
            while len(self.scores) > self.keep:
                del self.scores[next(iter(self.scores))]
            stats = {"judge_failures": sum(c["judge_failures"] for _, c in taken),
                     "truncated": sum(c["truncated"] for _, c in taken), "busy_s": self.busy_s}
            self.busy_s = 0.0
        return {k: v for k, (v, _) in zip(keys, taken)}, stats

    def release(self) -> None:
        """Offloaded reward models back to host memory once the step's scores are in (the policy trains next)."""
        for model in self.models.values():
            model.release()

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=60)
