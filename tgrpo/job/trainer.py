"""One job: every rank runs `main`; its roles (rollout, policy, reference, critic) decide its part of each step.

    main -> rank_life.run (checks, log, signals) -> connect (groups, heartbeat) -> setup (engines, models, plans)
         -> run_steps -> finish

A step, as one batch sees it:
  rollout ranks:    prompts -> vLLM -> rewards ----------------.
  data group:       all_gather of the samples  <-----------------'
  reward holders:   rewards from models (reward models, the judge) of every sample, gathered to every rank
  reference holders: reference logprobs of every sample (beta > 0), gathered to every rank
  critic holders:   values of every completion token (advantage_estimator gae), gathered to every rank
  every rank:       advantages from the whole batch: group advantages (grpo) or GAE over the values (gae)
  critic holders:   clipped value loss -> ZeRO step (gae)
  policy ranks:     their slice of the samples -> loss -> ZeRO step
  sync group:       gathered buckets or ZeRO-3 shards, broadcast policy -> rollout, loaded into vLLM
  data group:       policy and critic metrics -> rank 0, which logs

With max_staleness = k >= 1 (split placement), rollout ranks generate the next k steps' batches while the policy
trains on this one (between the sample gather and the weight sync), so a step takes about the longer of generation
and training instead of their sum; samples are then up to k updates old and tis_cap's importance weights correct it.

With async_mode (tgrpo.rollout.stream), a rollout rank's engine generates without a break: it takes the step's share
of finished groups (stream.take), keeps its engine's outputs moving while it waits at the step's barriers
(_await_others), and the weights reach the engine in flight (stream.pause_for_update, the sync, stream.updated).
The collectives are the same, in the same order, as in the other modes.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tgrpo import console
from tgrpo.algorithm import KLController
from tgrpo.config import Config, load_config
from tgrpo.errors import ConfigError, JobError
from tgrpo.job import build_locks, checkpoint, checks, model_rewards, rank_life
from tgrpo.job.metrics import Metrics, staleness_stats, step_metrics
from tgrpo.job.placement import CRITIC, POLICY, REFERENCE, Groups, Placement, build_groups
from tgrpo.job.watchdog import Watchdog, limits as watchdog_limits
from tgrpo.policy import lora
from tgrpo.rollout.worker import RolloutWorker, assign_advantages, assign_gae, kl_into_rewards, mean_token_kl
from tgrpo.sync import weights as sync
from tgrpo.sync.buckets import ShardPlan

BF16_MEAN_ATOL = 0.05  # sync check in bfloat16: largest mean |logprob difference| per token


def main(argv: list[str] | None = None) -> None:
    rank_life.run(lambda: load_config(argv), _run)


def _run(cfg: Config, placement: Placement, rank: int) -> None:
    job = setup(cfg, placement, rank)
    run_steps(job, job.start_step, cfg.max_steps, cfg.max_staleness)
    finish(job)


def dtypes(cfg: Config) -> tuple[str, torch.dtype]:
    name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    return name, getattr(torch, name)


@dataclass
class Job:
    """Everything a rank holds once started: its groups, engine, policy or reference, and the weight plan."""
    cfg: Config
    placement: Placement
    groups: Groups
    rank: int
    device: torch.device
    model_dir: str
    log: Metrics
    plan: list
    worker: RolloutWorker | None = None
    policy: object = None
    reference: object = None
    critic: object = None  # advantage_estimator gae: on the policy ranks, or on critic ranks of their own
    kl: KLController | None = None  # the KL coefficient of kl_in_reward (fixed or adaptive)
    # batches generated ahead of their step (max_staleness >= 1): (step, weights version, samples, metrics)
    ahead: deque = field(default_factory=deque)
    shard_plan: ShardPlan | None = None
    start_step: int = 0  # the step a resumed run continues after
    watchdog: Watchdog | None = None
    stopped_at: int | None = None  # the step after which a preemption request stopped the run (saved there)
    nonfinite_in_a_row: int = 0  # steps in a row with an update skipped for NaN/inf (max_nonfinite_in_a_row stops)
    adapter_config: dict | None = None  # use_lora: the adapter's peft config (adapter_config.json)
    stream: object = None  # async_mode, on rollout ranks: the continuous rollout (tgrpo.rollout.stream.GroupStream)
    export_plan: list | None = None  # what a checkpoint exports: the plan, and a frozen vision tower's weights
    scoring: model_rewards.Scoring | None = None  # rewards from models: what this rank holds, scores, sends
    reward_norms: dict = field(default_factory=dict)  # reward_model_normalize running: each reward model's stats

    @property
    def engine(self):
        return self.worker.engine if self.worker is not None else None

    @property
    def is_source(self) -> bool:
        return self.rank == self.placement.sync_source


@dataclass
class Connection:
    """A rank joined to the job: its backend, process groups and heartbeat. Made by `connect`, before any model
    or engine; a caller that needs groups of its own (the weight-sync benchmark) makes them right after it, while
    every rank's default group is still the world."""
    backend: str
    groups: Groups
    watchdog: Watchdog | None
    started: float  # perf_counter() when the rank began to connect


def connect(cfg: Config, placement: Placement, rank: int) -> Connection:
    t_start = time.perf_counter()
    backend = rank_life.pick_backend(cfg.backend)
    rank_life.init(backend, cfg.dist_timeout_s)
    hang_s, startup_s = watchdog_limits(cfg.hang_report_s, cfg.startup_report_s, cfg.dist_timeout_s)
    watch = (Watchdog(rank_life.default_store(), rank, placement.world_size, placement.role_name(rank),
                      os.path.join(cfg.output_dir, "logs"), hang_s, nccl_trace=rank_life.nccl_trace,
                      startup_after_s=startup_s)
             if cfg.hang_report_s > 0 else None)
    return Connection(backend, build_groups(placement, backend, cfg.dist_timeout_s), watch, t_start)


def setup(cfg: Config, placement: Placement, rank: int, connection: Connection | None = None) -> Job:
    """What every rank does before the first step: connect (unless given), data checks on the engine ranks,
    engines, ZeRO-3 models, the weight plans, and a resumed run's checkpoint."""
    connection = connection or connect(cfg, placement, rank)
    groups, watch, t_start = connection.groups, connection.watchdog, connection.started
    starting = (lambda what: watch.at(0, f"start-up: {what}")) if watch is not None else (lambda what: None)
    model_dir = checks.model_dir(cfg)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype_name, dtype = dtypes(cfg)
    roles = placement.roles(rank)

    if cfg.overwrite_output_dir and rank == placement.sync_source:
        checkpoint.clear_previous_run(cfg.output_dir)  # before the gather below, after which ranks write there
    # Pre-flight: engine ranks read and check the data before any engine starts; every rank learns the verdict.
    worker, problem = None, None
    starting("reading and checking the data")

    def engine_died(message: str) -> None:  # from the engine watcher's thread: one line naming this rank, then exit
        rank_life.report_error_and_exit(rank, placement.role_name(rank), RuntimeError(message),
                                        os.path.join(cfg.output_dir, "logs"))

    if rank in placement.engine_ranks:
        try:
            worker = RolloutWorker(cfg, placement, rank, model_dir, on_engine_death=engine_died)
        except ConfigError as e:
            problem = str(e)
    verdicts = rank_life.gather_objects(problem, groups.data)
    if any(verdicts):
        raise ConfigError(next(v for v in verdicts if v))

    found = None
    if rank == placement.sync_source:  # reads the checkpoint's files once; every rank gets the verdict
        try:
            found = (checkpoint.resume_path(cfg), None)
        except ConfigError as e:
            found = (None, str(e))
    resume, problem = rank_life.broadcast_object(found, groups.data, placement.sync_source)
    if problem:
        raise ConfigError(problem)
    if resume is not None:
        try:
            checkpoint.check_resumable(resume, placement, critic_expected=cfg.advantage_estimator == "gae",
                                       use_lora=cfg.use_lora)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    start_step = checkpoint.read_state(resume)["step"] if resume else 0
    log = Metrics(cfg, enabled=rank == 0, start_step=start_step)
    if worker is not None and worker.dropped:
        console.warn_once(f"[rank {rank} rollout] dropped {worker.dropped} prompts longer than max_prompt_length")
    if worker is not None:  # first: colocated on a GPU, vLLM sizes its KV cache from the memory it finds free
        starting("starting its vLLM engine")
        worker.start_engine(dtype_name)
    policy = reference = critic = None
    if roles & {POLICY, REFERENCE, CRITIC}:  # DeepSpeed may build its ops: a killed build's lock would stall it
        build_locks.wait_for_build_locks(lambda line: console.warn_once(f"[rank {rank}] {line}"), starting)
    if POLICY in roles:
        from tgrpo.policy.worker import PolicyWorker

        rank_life.make_default_group(groups.policy)
        starting("loading the policy into DeepSpeed, which may build its ops")
        policy = PolicyWorker(cfg, placement, groups, rank, model_dir, device, dtype)
    elif REFERENCE in roles:
        from tgrpo.policy.worker import ReferenceWorker

        rank_life.make_default_group(groups.reference)
        starting("loading the reference into DeepSpeed")
        reference = ReferenceWorker(cfg, placement, rank, model_dir, device, dtype)
    elif CRITIC in roles:
        rank_life.make_default_group(groups.critic)
    if cfg.advantage_estimator == "gae" and (CRITIC in roles or (POLICY in roles and not placement.critic)):
        from tgrpo.policy.critic import CriticWorker

        holders = placement.critic or placement.policy
        starting("loading the critic into DeepSpeed")
        critic = CriticWorker(cfg, holders, groups.critic or groups.policy, rank, checks.critic_dir(cfg), device,
                              dtype, placement.zero_stage)

    scoring = None
    if model_rewards.reward.entries(cfg):
        starting("loading the reward models and the judge")
        problem = None
        try:
            scoring = model_rewards.start(cfg, placement, rank, device, dtype, dtype_name, groups.rewards,
                                          engine_died)
        except ConfigError as e:  # on one rank: every rank learns it, rank 0 says it
            problem = str(e)
        verdicts = rank_life.gather_objects(problem, groups.data)
        if any(verdicts):
            raise ConfigError(next(v for v in verdicts if v))
        if worker is not None:
            worker.finished_group = scoring.sink()

    # The gather plan (checkpoints, colocated and sync_mode gather) and, for sync_mode partitions, the shard plan:
    # zero-copy when every policy rank's shards sit at the same offsets of DeepSpeed's flat buffer.
    split_partitions = not placement.colocated and placement.sync_mode == "partitions"
    starting("waiting for every rank's models and engines")
    layouts = rank_life.gather_objects(sync.shard_layout(policy.model) if policy is not None and split_partitions
                                       else None, groups.data)
    policy_layouts = [layouts[r] for r in placement.policy]
    zero_copy = policy_layouts[0] is not None and all(x == policy_layouts[0] for x in policy_layouts)
    plans = None
    if rank == placement.sync_source:
        bucket_bytes = cfg.sync_bucket_mb << 20
        adapter_only = cfg.use_lora  # LoRA: syncs and checkpoints move the adapter alone
        plans = (sync.model_plan(policy.model, bucket_bytes, adapter_only),
                 sync.shard_plan(policy.model, bucket_bytes, placement.num_policy, zero_copy, adapter_only)
                 if split_partitions else None,
                 lora.config_dict(policy.model) if cfg.use_lora else None,
                 # a checkpoint exports every weight, a frozen vision tower's too (syncs leave it out)
                 sync.model_plan(policy.model, bucket_bytes, everything=True) if cfg.freeze_vision_tower else None)
    plan, shard_plan, adapter_config, export_plan = rank_life.broadcast_object(plans, groups.data,
                                                                               placement.sync_source)
    if worker is not None and adapter_config is not None:
        worker.engine.use_adapter(adapter_config)
    job = Job(cfg, placement, groups, rank, device, model_dir, log, plan, worker, policy, reference, critic,
              KLController(cfg.kl_ctrl, cfg.beta, cfg.kl_target, cfg.kl_horizon), shard_plan=shard_plan,
              watchdog=watch, adapter_config=adapter_config, export_plan=export_plan or plan,
              scoring=scoring, reward_norms=model_rewards.norms(cfg))
    engines = len(placement.engine_ranks)
    log.message(f"ready in {time.perf_counter() - t_start:.0f} s: {engines} vLLM engine{'s' * (engines > 1)}, the "
                f"policy on {placement.num_policy} rank{'s' * (placement.num_policy > 1)} (ZeRO-{placement.zero_stage}"
                f"{', auto' if placement.zero_stage_auto else ''})"
                + (f", the reference on {len(placement.reference)}" if placement.reference else "")
                + (f", reward models on {len(placement.reward)}" if placement.reward else "")
                + (f", the judge on {len(placement.judge)}" if placement.judge else "")
                + (f", the critic on {len(placement.critic)}" if placement.critic else
                   ", the critic beside it" if cfg.advantage_estimator == "gae" else "")
                + (", colocated" if placement.colocated else "")
                + (f"; LoRA r={cfg.lora_r}: {sum(b.numel for b in plan) / 1e6:.2f}M adapter parameters synced"
                   if cfg.use_lora else ""))
    if resume is not None:
        starting(f"loading the checkpoint {resume}")
        job.start_step = checkpoint.load(job, resume)
        sync_weights(job)  # the engines started from the base model
        log.message(f"resumed from {resume} (step {job.start_step})")
    if cfg.async_mode:  # the groups a resumed run still owes, trained and dropped ones as its checkpoint says
        states = rank_life.broadcast_object(checkpoint.read_stream(resume) if resume and job.is_source else None,
                                            groups.data, placement.sync_source)
        if worker is not None:
            from tgrpo.rollout.stream import GroupStream

            mine = next((x for x in states or [] if x["index"] == worker.index), None)
            job.stream = GroupStream(worker, cfg, job.start_step, mine)
    return job


def sync_weights(job: Job) -> float:
    """Policy -> engines: colocated ranks load what they gather; otherwise senders broadcast, engines receive.
    Returns this rank's seconds until its part is done on the device (an engine's: loaded into vLLM)."""
    t0 = time.perf_counter()
    engine, policy, groups = job.engine, job.policy, job.groups
    if job.placement.colocated:
        if engine is not None:
            if job.device.type == "cuda":
                torch.cuda.empty_cache()  # the policy's cached activations: vLLM takes its memory back on waking
            engine.wake_up()
        sync.load_colocated(policy.model, job.plan, engine, job.device)
    elif job.placement.sync_mode == "partitions":
        if policy is not None:
            (group, src), = groups.parts
            sync.send_shards(policy.model, job.shard_plan, group, src, job.device)
        elif engine is not None:
            sync.receive_shards(engine, job.shard_plan, groups.parts)
    elif policy is not None:
        sync.send_weights(policy.model, job.plan, groups.sync, groups.sync_src, groups.is_sender, job.device)
    elif engine is not None:
        sync.receive_weights(engine, job.plan, groups.sync, groups.sync_src)
    if job.device.type == "cuda":
        torch.cuda.synchronize()  # the broadcasts are queued, not done, when the calls return
    return time.perf_counter() - t0


def _await_others(job: Job) -> None:
    """A barrier of every rank. In async_mode a rollout rank keeps its engine's outputs moving meanwhile (finished
    groups scored, new ones fed): the others are training or computing what the step needs."""
    if job.cfg.async_mode:
        work = dist.barrier(group=job.groups.data, async_op=True)
        while job.stream is not None and not work.is_completed():
            job.stream.pump(wait=True)
        work.wait()
    else:
        dist.barrier(group=job.groups.data)


def _batch_for(job: Job, step: int):
    """This engine's samples of `step`: generated ahead (max_staleness >= 1) or now, with the weights' lag."""
    if job.ahead and job.ahead[0][0] == step:
        _, version, samples, metrics = job.ahead.popleft()
    else:
        version = step
        samples, metrics = job.worker.rollout(step)
    return samples, {**metrics, "staleness": step - version}


def _generate_ahead(job: Job, step: int, last: int, staleness: int) -> None:
    """While the policy trains on `step`, fill the queue up to `staleness` batches ahead with the current weights
    (version `step`: the engine has every update up to this step's)."""
    queued = {s for s, *_ in job.ahead}
    for ahead in range(step + 1, min(step + staleness, last - 1) + 1):
        if ahead not in queued:
            job.ahead.append((ahead, step, *job.worker.rollout(ahead)))


def run_steps(job: Job, first: int, last: int, staleness: int) -> list[dict]:
    """Steps first..last-1. With staleness k >= 1, rollout ranks generate the batches of the next k steps while the
    policy trains on this one; every collective keeps the same order on every rank, so this is a reordering of the
    rollout ranks' work, not a thread. Returns the steps' scalars (on rank 0; empty dicts elsewhere)."""
    cfg, placement, groups, rank = job.cfg, job.placement, job.groups, job.rank
    worker, engine, policy = job.worker, job.engine, job.policy
    history = []
    watch = job.watchdog.at if job.watchdog is not None else (lambda step, phase: None)
    for step in range(first, last):
        t_step = time.perf_counter()
        watch(step + 1, "generate")
        if job.stream is not None:
            local = job.stream.take(step)
        else:
            local = _batch_for(job, step) if worker is not None else ([], None)
        watch(step + 1, "gather samples")
        t_gather = time.perf_counter()
        everyone = rank_life.gather_objects(local, groups.data)
        gather_s = time.perf_counter() - t_gather
        samples = [s for rank_samples, _ in everyone for s in rank_samples]
        rollout_metrics = [m for _, m in everyone if m is not None]
        if placement.colocated and engine is not None:
            engine.sleep()
        watch(step + 1, "rewards from models")
        model_stats = model_rewards.attach(job, samples, lambda: _await_others(job))
        if cfg.beta > 0:
            _attach_reference_logprobs(job, job.reference or policy, samples)
        kl_coef = job.kl.value if cfg.kl_in_reward else 0.0  # this step's; the controller moves after it
        step_stats = {}
        if cfg.advantage_estimator == "gae":
            watch(step + 1, "values")
            t_values = time.perf_counter()
            _attach_values(job, job.critic, samples)
            step_stats = assign_gae(samples, cfg.gamma, cfg.lam, kl_coef, cfg.mask_truncated_completions)
            step_stats["time/values_s"] = time.perf_counter() - t_values  # the critic's forward, gathered
        else:
            if cfg.kl_in_reward:
                kl_into_rewards(samples, kl_coef)
            assign_advantages(samples, cfg.num_generations, cfg.scale_rewards)
        step_stats.update(model_stats)
        if cfg.async_mode:
            step_stats.update(staleness_stats(samples, step, cfg.max_staleness))
            for s in samples:
                s.fresh_mask = [int(v == step) for v in s.versions]
        if cfg.kl_in_reward:
            current = mean_token_kl(samples)
            step_stats.update({"kl_ctrl/coef": kl_coef, "kl_ctrl/kl_per_token": current})
            job.kl.update(current, len(samples))

        train_metrics: dict = {}
        critic_metrics: dict = {}
        if worker is not None and staleness > 0:
            _generate_ahead(job, step, last, staleness)
        watch(step + 1, "train")
        if job.critic is not None:
            critic_metrics = job.critic.train_step(samples)
        if policy is not None and not (cfg.advantage_estimator == "gae" and step < cfg.critic_warmup_steps):
            train_metrics = policy.train_step(samples)
        watch(step + 1, "sync")
        # every rank here first, so that the sync is timed from its start, not from an engine's wait for training
        _await_others(job)
        t_sync = time.perf_counter()
        if job.stream is not None:  # in flight: the engine stops between two of its steps, requests kept
            job.stream.pause_for_update(step + 1)
        sync_s = sync_weights(job)
        if job.stream is not None:
            job.stream.updated(step + 1)
        train_metrics["wait_s"] = t_sync - t_step - train_metrics.get("train_s", 0.0)

        if cfg.sync_check:
            train_metrics.update(_sync_check(cfg, placement, groups, worker, policy, step))
        watch(step + 1, "gather metrics")
        critic_source = (placement.critic or placement.policy)[0]
        shared = rank_life.gather_objects(
            (train_metrics if job.is_source else None, critic_metrics if rank == critic_source else None, sync_s),
            groups.data)
        train_metrics = {**shared[placement.sync_source][0], **(shared[critic_source][1] or {}), **step_stats,
                         "sync_s": max(s for _, _, s in shared)}
        _check_finite(job, step + 1, train_metrics)
        if cfg.sync_check and not train_metrics["sync_check/passed"]:
            raise JobError(f"sync check failed after step {step + 1}: vLLM's greedy tokens or logprobs differ from "
                           f"the policy's (token match {train_metrics['sync_check/token_match']:.3f}, max logprob "
                           f"diff {train_metrics['sync_check/max_logprob_diff']:.2e})")

        done = step + 1
        scalars = step_metrics(samples, rollout_metrics, train_metrics)
        scalars["time/gather_s"] = gather_s  # rank 0's: on a rollout rank, the samples' trip to every rank
        scalars["time/step_s"] = time.perf_counter() - t_step  # evaluation and saving are timed on their own
        scalars["time/policy_idle_frac"] = train_metrics["wait_s"] / scalars["time/step_s"]
        if cfg.eval_steps and (done % cfg.eval_steps == 0 or done == cfg.max_steps):
            watch(step + 1, "eval")
            t_eval = time.perf_counter()
            scalars.update(_evaluate(cfg, placement, groups, worker, job.log, done))
            scalars["time/eval_s"] = time.perf_counter() - t_eval
        # a save-and-stop request is agreed on as late in the step as it can be (every rank alike, at the same
        # step): one that came during this step's sync, sync check or evaluation stops the run after this step
        preempted = any(rank_life.gather_objects(rank_life.preemption_requested(), groups.data))
        if (cfg.save_steps and done % cfg.save_steps == 0) or done == cfg.max_steps or preempted:
            watch(step + 1, "save")
            t_save = time.perf_counter()
            path = checkpoint.save(job, done)
            scalars["time/save_s"] = time.perf_counter() - t_save
            job.log.message(f"saved {path}")
        if scalars.get("tool/search_failures"):
            job.log.message(f"step {done}: {scalars['tool/search_failures']:g} searches failed; their episodes read "
                            f"'(search failed)' (retriever_on_failure=empty)")
        job.log.log(done, samples, scalars)
        history.append(scalars if rank == 0 else {})
        if preempted and done < cfg.max_steps:
            job.stopped_at = done
            if rank == 0:
                os.makedirs(os.path.join(cfg.output_dir, "logs"), exist_ok=True)
                with open(os.path.join(cfg.output_dir, "logs", rank_life.PREEMPTED), "w") as f:
                    f.write(f"{done}\n")
            break
    return history


def _check_finite(job: Job, step: int, train_metrics: dict) -> None:
    """A step with an update skipped for a NaN/inf loss or gradient norm (the policy's or the critic's; every rank
    has the same counts, gathered with the metrics) is said in one line by rank 0; max_nonfinite_in_a_row such steps
    in a row stop the run on every rank alike (JobError), before the step saves anything: weights that stay NaN
    would make every later update NaN too, and a run that only skips is not training."""
    cfg = job.cfg
    skipped = {"policy": int(train_metrics.get("nonfinite_updates", 0)),
               "critic": int(train_metrics.get("critic/nonfinite_updates", 0))}
    if not any(skipped.values()):
        job.nonfinite_in_a_row = 0
        return
    job.nonfinite_in_a_row += 1
    updates = cfg.num_iterations * cfg.mini_batches
    models = ["policy", "critic"] if cfg.advantage_estimator == "gae" else ["policy"]
    what = ", ".join(f"{skipped[m]} of {updates} {m + ' ' if len(models) > 1 else ''}updates" for m in models
                     if skipped[m])
    unchanged = ", the weights unchanged" if all(skipped[m] == updates for m in models) else ""
    line = f"step {step}: the loss or gradient norm was NaN/inf: {what} skipped{unchanged}"
    row, limit = job.nonfinite_in_a_row, cfg.max_nonfinite_in_a_row
    if row >= limit:
        raise JobError(f"{line}; {f'{row} steps in a row' if row > 1 else 'stopped at the first'} "
                       f"(max_nonfinite_in_a_row {limit}): the run stops, this step unsaved; "
                       + checkpoint.nonfinite_advice(cfg.output_dir))
    job.log.message(f"{line} ({row} in a row; max_nonfinite_in_a_row {limit} stops the run)")


def finish(job: Job) -> None:
    if job.watchdog is not None:
        job.watchdog.at(job.stopped_at or job.cfg.max_steps, "finish")
    dist.barrier(group=job.groups.data)  # checkpoints written before anyone reports success
    if job.watchdog is not None:
        job.watchdog.stop()
    if job.stopped_at is not None:
        job.log.message(f"preempted: stopped after step {job.stopped_at}, saved; run again with --resume auto "
                        "(launch/slurm.sbatch requeues the job, which does)")
    else:
        trend = job.log.reward_trend()  # the whole run's, a resumed one's included: did it learn?
        job.log.message(f"done: {job.cfg.max_steps} steps{', ' + trend if trend else ''}; "
                        f"outputs in {job.cfg.output_dir}")
    job.log.close()
    if job.stream is not None:
        job.stream.close()
    if job.scoring is not None:
        job.scoring.close()
    if job.worker is not None:
        job.worker.scorer.close()
        if job.worker.retriever is not None:
            job.worker.retriever.close()
        job.engine.shutdown()
    dist.destroy_process_group()


def _evaluate(cfg, placement, groups, worker, log, step: int) -> dict[str, float]:
    """Every engine evaluates its share of the eval prompts; rank 0 gets the sums."""
    mine = worker.evaluate() if worker is not None else None
    parts = [e for e in rank_life.gather_objects(mine, groups.data) if e is not None]
    prompts = max(1, sum(p["prompts"] for p in parts))
    result = {"eval/pass@1": sum(p["greedy_correct"] for p in parts) / prompts,
              f"eval/mean@{cfg.eval_k}": sum(p["sampled_correct"] for p in parts) / prompts,
              "eval/greedy_reward_mean": sum(p["greedy_reward"] for p in parts) / prompts}
    log.message(f"eval after step {step}: " + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in
                                                          result.items()) + f" ({prompts} prompts)")
    return result


def _attach_reference_logprobs(job: Job, holder, samples: list) -> None:
    """The ranks holding the reference (ranks of its own, else the policy ranks) score balanced shares of the
    batch; every rank gets every sample's reference logprobs."""
    holders = job.placement.reference or job.placement.policy
    mine = holder.reference_logprobs(samples) if job.rank in holders else None
    if job.cfg.async_mode:
        _await_others(job)  # the engines generate while the holders compute
    for entry in rank_life.gather_objects(mine, job.groups.data):
        for index, values in entry or []:
            samples[index].ref_logprobs = values


def _attach_values(job: Job, critic, samples: list) -> None:
    """advantage_estimator gae: the ranks holding the critic (ranks of its own, else the policy ranks) score
    balanced shares of the batch; every rank gets every sample's values."""
    holders = job.placement.critic or job.placement.policy
    mine = critic.values(samples) if job.rank in holders else None
    if job.cfg.async_mode:
        _await_others(job)  # the engines generate while the holders compute
    for entry in rank_life.gather_objects(mine, job.groups.data):
        for index, values in entry or []:
            samples[index].values = values


def _sync_check(cfg, placement, groups, worker, policy, step: int) -> dict:
    """Greedy tokens and logprobs of each rollout engine against the policy's own on the same sequences."""
    mine = None
    if worker is not None:
        prompts = worker.step_prompts(step)[:cfg.sync_check_prompts]
        mine = ([p.prompt_ids for p in prompts], [worker.media(p)[2] for p in prompts], worker.greedy(prompts))
    everyone = rank_life.gather_objects(mine, groups.data)
    if policy is None:
        return {}
    prompts = [p for entry in everyone if entry for p in entry[0]]
    images = [i for entry in everyone if entry for i in entry[1]]  # vision-language: the prompts' pixels
    engine_out = [g for entry in everyone if entry for g in entry[2]]
    policy_out = policy.score_sequences(prompts, [tokens for tokens, _ in engine_out], images)
    matched = sum(tokens == argmax for (tokens, _), (argmax, _) in zip(engine_out, policy_out))
    diffs = [abs(a - b) for (_, lp_e), (_, lp_p) in zip(engine_out, policy_out) for a, b in zip(lp_e, lp_p)]
    max_diff = max(diffs, default=0.0)
    token_match = matched / max(1, len(engine_out))
    exact = dtypes(cfg)[1] == torch.float32
    atol = cfg.sync_check_atol if cfg.sync_check_atol is not None else (5e-3 if exact else 1.0)
    mean_diff = sum(diffs) / max(1, len(diffs))
    return {"sync_check/token_match": token_match, "sync_check/max_logprob_diff": max_diff,
            "sync_check/mean_logprob_diff": mean_diff,
            "sync_check/passed": float((token_match == 1.0 or not exact) and max_diff <= atol
                                       and (exact or mean_diff <= BF16_MEAN_ATOL))}
