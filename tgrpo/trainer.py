"""One GRPO job: every rank runs `main`; its role (rollout or policy) decides which half of each step it does.

A step, as one batch sees it:
  rollout ranks:  prompts -> vLLM -> rewards -> advantages ---.
  data group:     all_gather of the samples  <-----------------'
  policy ranks:   their slice of the samples -> loss -> ZeRO-3 step
  sync group:     gathered buckets, broadcast policy -> rollout, loaded into vLLM
  data group:     policy metrics -> rank 0, which logs
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from tgrpo import checkpoint, data, distributed, sync
from tgrpo.config import Config, ConfigError, load_config
from tgrpo.metrics import Metrics, step_metrics
from tgrpo.rollout import RolloutWorker, kl_into_rewards
from tgrpo.placement import POLICY, REFERENCE, build_groups


class JobError(RuntimeError):
    """A failure every rank learns of at the same point (a failed sync check): rank 0 reports it once."""


def main(argv: list[str] | None = None) -> None:
    distributed.adopt_slurm_env()
    rank, world_size = distributed.env_rank(), distributed.env_world_size()
    try:
        cfg = load_config(argv)
        placement = cfg.validate(world_size, distributed.env_local_world_size())
    except ConfigError as e:
        _fail_once(rank, e, status=2)
    role = placement.role_name(rank)
    _quiet_libraries()
    _stack_dumps(cfg, rank)
    try:
        _run(cfg, placement, rank)
    except (ConfigError, JobError) as e:
        _fail_once(rank, e, status=2 if isinstance(e, ConfigError) else 1)
    except BaseException as e:  # noqa: BLE001 - every other failure: one line per failing rank, then exit
        distributed.report_error_and_exit(rank, role, e, os.path.join(cfg.output_dir, "logs"))


def _fail_once(rank: int, error: Exception, status: int) -> None:
    if rank == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


def _stack_dumps(cfg: Config, rank: int) -> None:
    """TGRPO_STACK_DUMP_S=N: every N seconds each rank writes its Python stacks to output_dir/logs/stacks-rankR.txt,
    which shows where a hung job waits (a collective, an engine call) without attaching a debugger."""
    every = float(os.environ.get("TGRPO_STACK_DUMP_S", "0") or 0)
    if every > 0:
        import faulthandler

        os.makedirs(os.path.join(cfg.output_dir, "logs"), exist_ok=True)
        faulthandler.dump_traceback_later(every, repeat=True, file=open(
            os.path.join(cfg.output_dir, "logs", f"stacks-rank{rank}.txt"), "w"))


def _quiet_libraries() -> None:
    """Rank 0's progress bar is the output; engines log warnings and errors only."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def resolve_model(cfg: Config) -> str:
    if cfg.model == "tiny":
        from tgrpo.tiny import ensure_tiny_model

        return ensure_tiny_model(cfg.cache_dir)
    return cfg.model


def _dtypes(cfg: Config) -> tuple[str, torch.dtype]:
    name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    return name, getattr(torch, name)


def _run(cfg: Config, placement, rank: int) -> None:
    model_dir = resolve_model(cfg)
    backend = distributed.pick_backend(cfg.backend)
    distributed.init(backend, cfg.dist_timeout_s)
    groups = build_groups(placement, backend, cfg.dist_timeout_s)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype_name, dtype = _dtypes(cfg)
    roles = placement.roles(rank)
    is_source = rank == placement.sync_source
    drives_engine = rank in placement.engine_ranks

    # Pre-flight: engine ranks read and check the data before any engine starts; every rank learns the verdict.
    worker, problem = None, None
    if drives_engine:
        try:
            worker = RolloutWorker(cfg, placement, rank, model_dir)
        except ConfigError as e:
            problem = str(e)
    verdicts: list = [None] * placement.world_size
    dist.all_gather_object(verdicts, problem, group=groups.data)
    if any(verdicts):
        raise ConfigError(next(v for v in verdicts if v))

    log = Metrics(cfg, enabled=rank == 0)
    if worker is not None and worker.dropped:
        print(f"[rank {rank} rollout] dropped {worker.dropped} prompts longer than max_prompt_length", flush=True)
    if drives_engine:  # first: colocated on a GPU, vLLM sizes its KV cache from the memory it finds free
        worker.start_engine(dtype_name)
    policy = reference = None
    if POLICY in roles:
        from tgrpo.policy import PolicyWorker

        distributed.make_default_group(groups.policy)
        policy = PolicyWorker(cfg, placement, groups, model_dir, device, dtype)
    elif REFERENCE in roles:
        from tgrpo.policy import ReferenceWorker

        distributed.make_default_group(groups.reference)
        reference = ReferenceWorker(cfg, placement, model_dir, device, dtype)
    engine = worker.engine if worker is not None else None

    plan = [sync.model_plan(policy.model, cfg.sync_bucket_mb << 20) if is_source else None]
    dist.broadcast_object_list(plan, group=groups.data, group_src=placement.sync_source)
    plan = plan[0]

    for step in range(cfg.max_steps):
        t_step = time.perf_counter()
        local = worker.rollout(step) if worker is not None else ([], None)
        everyone: list = [None] * placement.world_size
        dist.all_gather_object(everyone, local, group=groups.data)
        samples = [s for rank_samples, _ in everyone for s in rank_samples]
        rollout_metrics = [m for _, m in everyone if m is not None]
        if placement.colocated and engine is not None:
            engine.sleep()
        if cfg.beta > 0:
            _attach_reference_logprobs(placement, groups, reference or policy, samples, rank)
            if cfg.kl_in_reward:
                kl_into_rewards(samples, cfg.beta, cfg.num_generations, cfg.scale_rewards)

        train_metrics: dict = {}
        if policy is not None:
            index = placement.policy.index(rank)
            train_metrics = policy.train_step(samples, data.rank_slice(samples, index, placement.num_policy))

        t_sync = time.perf_counter()
        if placement.colocated:
            if engine is not None:
                engine.wake_up()
            sync.load_colocated(policy.model, plan, engine, device)
        elif policy is not None:
            sync.send_weights(policy.model, plan, groups.sync, groups.sync_src, is_source, device)
        elif engine is not None:
            sync.receive_weights(engine, plan, groups.sync, groups.sync_src, device)
        train_metrics["sync_s"] = time.perf_counter() - t_sync

        if cfg.sync_check:
            train_metrics.update(_sync_check(cfg, placement, groups, worker, policy, step))
        shared = [train_metrics if is_source else None]
        dist.broadcast_object_list(shared, group=groups.data, group_src=placement.sync_source)
        train_metrics = shared[0]
        if cfg.sync_check and not train_metrics["sync_check/passed"]:
            raise JobError(f"sync check failed after step {step + 1}: vLLM's greedy tokens or logprobs differ from "
                           f"the policy's (token match {train_metrics['sync_check/token_match']:.3f}, max logprob "
                           f"diff {train_metrics['sync_check/max_logprob_diff']:.2e})")

        done = step + 1
        scalars = step_metrics(samples, rollout_metrics, train_metrics)
        if cfg.eval_steps and (done % cfg.eval_steps == 0 or done == cfg.max_steps):
            scalars.update(_evaluate(cfg, placement, groups, worker, log, done))
        if policy is not None and ((cfg.save_steps and done % cfg.save_steps == 0) or done == cfg.max_steps):
            path = checkpoint.save_hf(policy.model, plan, model_dir, cfg.output_dir, done, is_writer=is_source)
            if is_source and rank == 0:
                log.message(f"saved {path}")
        scalars["time/step_s"] = time.perf_counter() - t_step
        log.log(done, samples, scalars)

    dist.barrier(group=groups.data)  # checkpoints written before anyone reports success
    log.message(f"done: {cfg.max_steps} steps; outputs in {cfg.output_dir}")
    log.close()
    if worker is not None:
        worker.scorer.close()
        engine.shutdown()
    dist.destroy_process_group()


def _evaluate(cfg, placement, groups, worker, log, step: int) -> dict[str, float]:
    """Every engine evaluates its share of the eval prompts; rank 0 gets the sums."""
    mine = worker.evaluate() if worker is not None else None
    everyone: list = [None] * placement.world_size
    dist.all_gather_object(everyone, mine, group=groups.data)
    parts = [e for e in everyone if e is not None]
    prompts = max(1, sum(p["prompts"] for p in parts))
    result = {"eval/pass@1": sum(p["greedy_correct"] for p in parts) / prompts,
              f"eval/mean@{cfg.eval_k}": sum(p["sampled_correct"] for p in parts) / prompts,
              "eval/greedy_reward_mean": sum(p["greedy_reward"] for p in parts) / prompts}
    log.message(f"eval after step {step}: " + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in
                                                          result.items()) + f" ({prompts} prompts)")
    return result


def _attach_reference_logprobs(placement, groups, holder, samples: list, rank: int) -> None:
    """The ranks holding the reference (ranks of its own, else the policy ranks) score equal slices of the batch;
    every rank gets every sample's reference logprobs."""
    holders = placement.reference or placement.policy
    mine = None
    if rank in holders:
        index = holders.index(rank)
        size = len(samples) // len(holders)
        mine = (index * size, holder.reference_logprobs(samples[index * size:(index + 1) * size]))
    everyone: list = [None] * placement.world_size
    dist.all_gather_object(everyone, mine, group=groups.data)
    for entry in everyone:
        if entry is not None:
            start, logprobs = entry
            for offset, values in enumerate(logprobs):
                samples[start + offset].ref_logprobs = values


def _sync_check(cfg, placement, groups, worker, policy, step: int) -> dict:
    """Greedy tokens and logprobs of each rollout engine against the policy's own on the same sequences."""
    mine = None
    if worker is not None:
        prompts = [p.prompt_ids for p in worker.step_prompts(step)[:cfg.sync_check_prompts]]
        mine = (prompts, worker.greedy(prompts))
    everyone: list = [None] * placement.world_size
    dist.all_gather_object(everyone, mine, group=groups.data)
    if policy is None:
        return {}
    prompts = [p for entry in everyone if entry for p in entry[0]]
    engine_out = [g for entry in everyone if entry for g in entry[1]]
    policy_out = policy.score_sequences(prompts, [tokens for tokens, _ in engine_out])
    matched = sum(tokens == argmax for (tokens, _), (argmax, _) in zip(engine_out, policy_out))
    diffs = [abs(a - b) for (_, lp_e), (_, lp_p) in zip(engine_out, policy_out) for a, b in zip(lp_e, lp_p)]
    max_diff = max(diffs, default=0.0)
    token_match = matched / max(1, len(engine_out))
    return {"sync_check/token_match": token_match, "sync_check/max_logprob_diff": max_diff,
            "sync_check/passed": float(token_match == 1.0 and max_diff <= cfg.sync_check_atol)}
