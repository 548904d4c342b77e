"""Rank-0 output: metrics.jsonl, samples.jsonl, a progress bar, and the scalars to tensorboard and/or wandb
(report_to). Other ranks get a no-op."""
from __future__ import annotations

import json
import math
import os
import statistics

from tgrpo import console
from tgrpo.reward_spec import conversation
from tgrpo.rollout.rewards import answer_reward

FLAT_STEPS = 3  # steps in a row whose every group's rewards are equal before the run says it learns nothing
_SUMMED = {"async/dropped_stale", "async/groups_in_flight", "async/groups_ready", "async/seqs_in_flight_mean"}


def staleness_stats(samples: list, step: int, max_staleness: int) -> dict[str, float]:
    """async_mode: the step's model tokens per lag (step - the version of the weights that sampled them), from
    every token's version: staleness/lag_0 ... lag_<max_staleness>, the mean and the largest lag."""
    counts = [0] * (max_staleness + 1)
    worst, total, weighted = 0, 0, 0
    for s in samples:
        for version, m in zip(s.versions, s.model_mask):
            if m:
                lag = step - version
                counts[min(lag, max_staleness)] += 1
                worst, total, weighted = max(worst, lag), total + 1, weighted + lag
    out = {f"staleness/lag_{d}_tokens": float(c) for d, c in enumerate(counts)}
    out.update({"staleness/mean": weighted / max(1, total), "staleness/max": float(worst)})
    return out


def step_metrics(samples: list, rollout: list[dict], train: dict) -> dict[str, float]:
    """One step's scalars from every sample and every rank's timings."""
    rewards = [s.reward for s in samples]
    lengths = [len(s.completion_ids) for s in samples]
    out = {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards),
        "completion/length_mean": statistics.fmean(lengths),
        "batch/tokens": sum(len(s.prompt_ids) for s in samples) + sum(lengths),
        "completion/truncated_fraction": statistics.fmean(float(s.truncated) for s in samples),
    }
    for name in samples[0].reward_parts:  # its mean and spread over the samples it applies to (TRL's None: NaN)
        values = [v for v in (s.reward_parts[name] for s in samples) if not math.isnan(v)]
        out[f"reward/{name}"] = out[f"reward/{name}/mean"] = statistics.fmean(values) if values else math.nan
        out[f"reward/{name}/std"] = statistics.pstdev(values) if values else math.nan  # TRL's rewards/<name>/...
    checker = answer_reward(samples[0].reward_parts)
    if checker:  # the answer-checking reward says which completions are correct
        out["accuracy"] = statistics.fmean(float(s.reward_parts[checker] >= 1.0) for s in samples)
    if any(s.completion_mask is not None for s in samples):  # multi-turn tool episodes
        model_tokens = [s.model_tokens for s in samples]
        out["tool/turns_mean"] = statistics.fmean(s.turns for s in samples)
        out["tool/calls_mean"] = statistics.fmean(s.tool_calls for s in samples)
        out["tool/calls"] = sum(s.tool_calls for s in samples)
        out["tool/episodes_with_calls"] = statistics.fmean(float(s.tool_calls > 0) for s in samples)
        out["tool/response_tokens_mean"] = statistics.fmean(l - m for l, m in zip(lengths, model_tokens))
        out["completion/model_tokens_mean"] = statistics.fmean(model_tokens)
        out["tool/search_failures"] = sum(r.get("search_failures", 0) for r in rollout)
        out["time/tool_s"] = max(r.get("tool_s", 0.0) for r in rollout)
    generate_s = max(r["generate_s"] for r in rollout)
    out["time/generate_s"] = generate_s
    out["time/reward_s"] = max(r["reward_s"] for r in rollout)
    out["rollout/groups_dropped"] = sum(r["groups_dropped"] for r in rollout)
    out["rollout/sampling_rounds"] = max(r["rounds"] for r in rollout)
    if any("device_used_gib" in r for r in rollout):
        out["memory/rollout_device_used_gib"] = max(r.get("device_used_gib", 0.0) for r in rollout)
    out["rollout/staleness"] = max(r.get("staleness", 0) for r in rollout)
    for key in (k for k in rollout[0] if k.startswith("async/")):  # async_mode: each engine's, summed or averaged
        values = [r[key] for r in rollout]
        out[key] = sum(values) if key in _SUMMED else statistics.fmean(values)
    out["reward/remote_failures"] = sum(r["remote_failures"] for r in rollout)
    out["throughput/generate_tokens_per_s"] = sum(r["generated_tokens"] for r in rollout) / max(generate_s, 1e-9)
    for key, value in train.items():
        if "/" in key:
            out[key] = value
        else:
            prefix = "throughput" if key.endswith("_per_s") else "time" if key.endswith("_s") else "policy"
            out[f"{prefix}/{key}"] = value
    return out


def _runs(values: list[int]) -> list[list[int]]:
    """[[value, how many in a row], ...]"""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def _truncate_after(path: str, step: int) -> list[dict]:
    """A run keeps the rows of a jsonl log up to the step it starts from (a restart before any checkpoint: none);
    returns the rows kept."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        kept = [(line, row) for line, row in ((line, json.loads(line)) for line in f if line.strip())
                if row.get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(line for line, _ in kept)
    os.replace(tmp, path)
    return [row for _, row in kept]


def reward_trend(rewards: dict[int, float], window: int = 5) -> str:
    """'reward 0.21 (first 5) -> 0.43 (last 5)': the mean reward of the first and the last `window` steps, so that
    the end of a run says whether it learned. Under 2 * window steps the windows shrink rather than overlap. When the
    steps known are not 1..N (a resumed run whose earlier rows are gone) the windows name their steps."""
    steps = sorted(rewards)
    if not steps:
        return ""
    if len(steps) == 1:
        return f"reward {rewards[steps[0]]:.2f} (step {steps[0]})"
    k = min(window, len(steps) // 2)
    head, tail = steps[:k], steps[-k:]
    mean = lambda part: statistics.fmean(rewards[s] for s in part)
    if steps == list(range(1, len(steps) + 1)):
        return f"reward {mean(head):.2f} (first {k}) -> {mean(tail):.2f} (last {k})"
    return (f"reward {mean(head):.2f} (steps {head[0]}-{head[-1]}) -> "
            f"{mean(tail):.2f} (steps {tail[0]}-{tail[-1]})")


def _start_wandb(cfg, start_step: int):
    """A wandb run in output_dir/wandb; a resumed run (start_step > 0) continues the run it resumes (its id kept in
    output_dir/wandb/run-id)."""
    import dataclasses
    import uuid

    import wandb

    root = os.path.join(cfg.output_dir, "wandb")
    os.makedirs(root, exist_ok=True)
    id_file = os.path.join(root, "run-id")
    run_id = open(id_file).read().strip() if start_step > 0 and os.path.exists(id_file) else uuid.uuid4().hex[:8]
    with open(id_file, "w") as f:
        f.write(run_id)
    return wandb.init(project=cfg.wandb_project, name=cfg.run_name or os.path.basename(os.path.abspath(cfg.output_dir)),
                      id=run_id, resume="allow", dir=cfg.output_dir, config=dataclasses.asdict(cfg))


class Metrics:
    def __init__(self, cfg, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.cfg = cfg
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        os.makedirs(cfg.output_dir, exist_ok=True)
        # a resumed run drops what followed its checkpoint; the steps before it still count in reward_trend
        kept = _truncate_after(os.path.join(cfg.output_dir, "metrics.jsonl"), start_step)
        _truncate_after(os.path.join(cfg.output_dir, "samples.jsonl"), start_step)
        self.rewards = {row["step"]: row["reward/mean"] for row in kept if "step" in row and "reward/mean" in row}
        self.writer = (SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"), purge_step=start_step + 1)
                       if "tensorboard" in cfg.report_to else None)
        self.wandb = _start_wandb(cfg, start_step) if "wandb" in cfg.report_to else None
        self.metrics_file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a")
        self.samples_file = open(os.path.join(cfg.output_dir, "samples.jsonl"), "a")
        self.bar = tqdm(total=cfg.max_steps, initial=start_step, desc="grpo", dynamic_ncols=True,
                        file=console.stdout())
        console.bar_drawn(True)
        self.flat: list[int] = []  # the latest steps in a row whose every group's rewards were all equal
        self.said_flat = False

    def log(self, step: int, samples: list, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.rewards[step] = scalars["reward/mean"]
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=["step", "prompt", "completion", "answer", "reward", "advantage"],
                                data=[[step, s.prompt_text, s.completion_text, s.answer, s.reward, s.advantage]
                                      for s in samples[:self.cfg.num_samples_to_log]])
            self.wandb.log({**scalars, "samples": table}, step=step)
        self.metrics_file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.metrics_file.flush()
        for s in samples[:self.cfg.num_samples_to_log]:
            row = {"step": step, "prompt": s.prompt_text, "completion": s.completion_text, "answer": s.answer,
                   "reward": s.reward, "reward_parts": s.reward_parts, "advantage": s.advantage,
                   "truncated": s.truncated}
            if getattr(s, "prompt", None) is not None:  # the prompt as reward models and judges read it (text parts)
                row["messages"] = conversation(s.prompt, "")[:-1]
            if s.completion_mask is not None:  # which tokens the model wrote (1) and which the tool did (0)
                row.update(turns=s.turns, tool_calls=s.tool_calls, completion_ids=s.completion_ids,
                           completion_mask=s.completion_mask,
                           segments=[{"text": text, "source": "model" if m else "tool"} for text, m in s.segments])
            if s.versions is not None:  # async_mode: its group, and each token's weights version as (version, count)
                row.update(group=list(s.group), versions=_runs(s.versions), completion_ids=s.completion_ids,
                           rollout_logprobs=s.rollout_logprobs)
            self.samples_file.write(json.dumps(row) + "\n")
        self.samples_file.flush()
        self.bar.set_postfix(reward=f"{scalars['reward/mean']:.3f}", step_s=f"{scalars['time/step_s']:.1f}",
                             refresh=False)
        self.bar.update(1)  # one redraw a step
        self._say_if_flat(step, samples, scalars["reward/mean"])

    def _say_if_flat(self, step: int, samples: list, reward: float) -> None:
        """Once a run: FLAT_STEPS steps in a row in which every group's completions got the same reward. Their
        advantages, loss and gradient are zero, so the run learns nothing, yet it would end 'done' without a word."""
        n = self.cfg.num_generations
        groups = [samples[i:i + n] for i in range(0, len(samples), n)]
        flat = bool(groups) and all(len({s.reward for s in group}) == 1 for group in groups)
        self.flat = self.flat + [step] if flat else []
        if len(self.flat) == FLAT_STEPS and not self.said_flat:
            self.said_flat = True
            self.message(f"warning: steps {self.flat[0]}-{self.flat[-1]}: every group's completions got the same "
                         f"reward (mean {reward:.3f}): the reward gives no signal to learn from (GRPO's advantages "
                         "and updates are zero). "
                         "The reward may have collapsed to a constant (a learning_rate too high? see policy/loss and "
                         "policy/grad_norm in metrics.jsonl) or the task gives this model no signal (check the reward "
                         "functions on samples.jsonl)")

    def reward_trend(self) -> str:
        """The run's first and last steps' mean reward ('' on other ranks, or before any step)."""
        return reward_trend(self.rewards) if self.enabled else ""

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=console.stdout())
            if console.copy_to_log():
                print(text, flush=True)  # the log file too

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            console.bar_drawn(False)
            if self.writer is not None:
                self.writer.close()
            if self.wandb is not None:
                self.wandb.finish()
            self.metrics_file.close()
            self.samples_file.close()
