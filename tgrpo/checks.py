"""Every check of a job that touches the world, in one place: `check_job` turns a config and the ranks launched
into the Placement, or raises one ConfigError line naming the problem and the fix.

node.sh's pre-flight (`python -m tgrpo.preflight`) calls it once per node before torchrun starts; every rank calls
it again before its process groups, engines or models start, so plain torchrun, srun and `accelerate launch` get
the same one-line errors. The trainer leaves the data rows and the retriever to the engine ranks (each reads its
prompts once when it starts, and every rank learns their verdict); the pre-flight reads them here.
"""
from __future__ import annotations

import os

from tgrpo.config import Config
from tgrpo.errors import ConfigError
from tgrpo.placement import Placement


def check_job(cfg: Config, world_size: int, local_world_size: int | None = None, *, data: bool = True) -> Placement:
    """The config's own rules, user reward modules, the placement against `world_size` ranks (local_world_size per
    node), the numbers that must divide among the ranks, files (model, DeepSpeed config, data), a checkpoint to
    resume, output_dir, and the model's config and tokenizer; with data=True also the data rows and the retriever.
    Builds the embedded tiny model if it is named and missing."""
    from tgrpo import checkpoint, rewards

    cfg.check()
    rewards.check_reward_config(cfg)
    placement = Placement.from_config(cfg, world_size, local_world_size)
    _check_batch_shape(cfg, placement)
    _check(not cfg.eval_data or os.path.exists(cfg.eval_data), f"eval_data '{cfg.eval_data}' does not exist")
    _check(os.path.isfile(cfg.deepspeed_config),
           f"deepspeed_config '{cfg.deepspeed_config}' does not exist: point it at a DeepSpeed JSON such as zero3.json")
    _check(os.path.exists(cfg.train_data), f"train_data '{cfg.train_data}' does not exist: give a chatml JSON file")
    if cfg.resume not in ("", "auto"):
        _check(checkpoint.is_complete(cfg.resume), f"resume='{cfg.resume}' is not a complete checkpoint folder (no "
               "trainer_state.json there): name an output_dir/checkpoints/step-N folder or use 'auto'")
        problem = checkpoint.damage(cfg.resume)
        _check(problem is None, f"checkpoint '{cfg.resume}' is damaged ({problem}): name an older one or use "
               "'auto', which skips damaged checkpoints")
    checkpoint.check_output_dir(cfg)
    if "wandb" in cfg.report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("report_to wandb needs the wandb package: WITH_WANDB=1 bash launch/setup.sh (or pip "
                              "install wandb); WANDB_MODE=offline logs without network") from None
    tokenizer = _check_model(cfg)
    if cfg.critic_model:
        from tgrpo.tiny import EMBEDDED

        _check(cfg.critic_model in EMBEDDED or os.path.isfile(os.path.join(cfg.critic_model, "config.json")),
               f"critic_model '{cfg.critic_model}' is not a model folder (no config.json there): give a local Hugging "
               "Face model folder, or leave it empty for the policy's model")
    if data:
        from tgrpo import data as prompts

        prompts.load_prompts(cfg, tokenizer)
        if cfg.retriever_url and cfg.retriever_on_failure == "fail":
            from tgrpo.retriever import connect

            retriever, problem = connect(cfg)
            retriever.close()
            _check(problem is None, problem or "")
    return placement


def model_dir(cfg: Config) -> str:
    """The model's folder: cfg.model, or the embedded tiny model's, built into cache_dir on first use."""
    from tgrpo.tiny import EMBEDDED, ensure_model

    if cfg.model in EMBEDDED:
        return ensure_model(cfg.cache_dir, cfg.model)
    return cfg.model


def critic_dir(cfg: Config) -> str:
    """The folder the critic starts from (advantage_estimator gae): critic_model, else the policy's model."""
    if not cfg.critic_model:
        return model_dir(cfg)
    from tgrpo.tiny import EMBEDDED, ensure_model

    return ensure_model(cfg.cache_dir, cfg.critic_model) if cfg.critic_model in EMBEDDED else cfg.critic_model


def _check_model(cfg: Config):
    """The model folder holds a config and a tokenizer that load; returns the tokenizer."""
    from tgrpo.tiny import EMBEDDED

    _check(cfg.model in EMBEDDED or os.path.isfile(os.path.join(cfg.model, "config.json")),
           f"model '{cfg.model}' is not a model folder (no config.json there): give a local Hugging Face model folder "
           "(download it first on clusters without internet), 'tiny' or 'tiny-search'")
    from transformers import AutoConfig, AutoTokenizer

    folder = model_dir(cfg)
    try:
        AutoConfig.from_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:  # a corrupt config.json or tokenizer file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model '{cfg.model}' cannot be loaded ({first}): check its config.json and tokenizer "
                          "files, or download it again") from None


def _check_batch_shape(cfg: Config, placement: Placement) -> None:
    """A step's prompts and samples divide among the engines and the policy (and reference) ranks."""
    _check(cfg.prompts_per_step % placement.num_engines == 0,
           f"prompts_per_step={cfg.prompts_per_step} must be divisible by the {placement.num_engines} rollout engines")
    samples = cfg.prompts_per_step * cfg.num_generations
    if cfg.max_tokens_per_micro_batch:
        trainers = max(placement.num_policy, len(placement.critic))
        _check(samples % cfg.mini_batches == 0 and samples // cfg.mini_batches >= trainers,
               f"prompts_per_step * num_generations = {samples} must split into mini_batches = {cfg.mini_batches} "
               f"equal mini-batches of at least one sample per {'policy and critic' if placement.critic else 'policy'} "
               f"rank ({trainers})")
        return
    per_step = placement.num_policy * cfg.micro_batch_size * cfg.mini_batches
    _check(samples % per_step == 0,
           f"prompts_per_step * num_generations = {samples} must be divisible by policy ranks * micro_batch_size * "
           f"mini_batches = {placement.num_policy} * {cfg.micro_batch_size} * {cfg.mini_batches}: every policy rank "
           "runs the same number of micro-batches")
    if placement.critic:
        per = len(placement.critic) * cfg.micro_batch_size * cfg.mini_batches
        _check(samples % per == 0, f"prompts_per_step * num_generations = {samples} must be divisible by critic "
               f"ranks * micro_batch_size * mini_batches = {per}")
    if placement.reference:
        per = len(placement.reference) * cfg.micro_batch_size
        _check(samples % per == 0, f"prompts_per_step * num_generations = {samples} must be divisible by reference "
               f"ranks * micro_batch_size = {per}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
