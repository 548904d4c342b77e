"""Every check of a job that touches the world, in one place: `check_job` turns a config and the ranks launched
into the Placement, or raises one ConfigError line naming the problem and the fix.

node.sh's pre-flight (`python -m tgrpo.job.preflight`) calls it once per node before torchrun starts; every rank calls
it again before its process groups, engines or models start, so plain torchrun, srun and `accelerate launch` get
the same one-line errors. The trainer leaves the data rows and the retriever to the engine ranks (each reads its
prompts once when it starts, and every rank learns their verdict); the pre-flight reads them here.
"""
from __future__ import annotations

import json
import os

from tgrpo.config import Config
from tgrpo.errors import ConfigError
from tgrpo.job.placement import Placement


def check_job(cfg: Config, world_size: int, local_world_size: int | None = None, *, data: bool = True) -> Placement:
    """The config's own rules, user reward modules, the placement against `world_size` ranks (local_world_size per
    node), the numbers that must divide among the ranks, files (model, DeepSpeed config, data), a checkpoint to
    resume, output_dir, the model's config and tokenizer (and a vision-language model's processor); with data=True also the data rows and the retriever.
    Builds the embedded tiny model if it is named and missing."""
    from tgrpo.job import checkpoint
    from tgrpo.rollout import rewards

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
        problem = checkpoint.damage(cfg.resume, content=False)  # sizes: every rank runs this; the content is
        # read once, by the rank that resumes the run (checkpoint.resume_path)
        _check(problem is None, f"checkpoint '{cfg.resume}' is damaged ({problem}): name an older one or use "
               "'auto', which skips damaged checkpoints")
    # the checkpoint's mode and placement, from its trainer_state.json alone: a run that cannot continue it stops
    # here (node.sh's pre-flight: exit 2, never retried), not after its engines started
    resumed = (cfg.resume if cfg.resume not in ("", "auto") else
               checkpoint.newest_by_size(cfg.output_dir) if cfg.resume == "auto" else None)
    if resumed:
        try:
            checkpoint.check_resumable(resumed, placement, critic_expected=cfg.advantage_estimator == "gae",
                                       use_lora=cfg.use_lora)
        except json.JSONDecodeError:  # a damaged state file: resume's own check names it ('auto' skips it)
            pass
        except ValueError as e:
            raise ConfigError(str(e)) from None
    checkpoint.check_output_dir(cfg)
    if "wandb" in cfg.report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("report_to wandb needs the wandb package: WITH_WANDB=1 bash launch/setup.sh (or pip "
                              "install wandb); WANDB_MODE=offline logs without network") from None
    tokenizer = _check_model(cfg)
    vision = _check_vision(cfg)
    _check_lora(cfg)
    if cfg.critic_model:
        from tgrpo.tiny import EMBEDDED

        _check(cfg.critic_model in EMBEDDED or os.path.isfile(os.path.join(cfg.critic_model, "config.json")),
               f"critic_model '{cfg.critic_model}' is not a model folder (no config.json there): give a local Hugging "
               "Face model folder, or leave it empty for the policy's model")
        if cfg.critic_model not in EMBEDDED:
            _check_weights(f"critic_model '{cfg.critic_model}'", cfg.critic_model)
    longest = None
    if data:
        from tgrpo import data as prompts

        rows = prompts.load_prompts(cfg, tokenizer, vision=vision)[0]
        longest = max((len(p.prompt_ids) for p in rows), default=None)
        if rewards.REMOTE in cfg.reward_funcs and cfg.reward_on_failure == "fail" and rows:
            service = rewards.RemoteReward(cfg)
            try:
                problem = service.check(rows[0].prompt_text, rows[0].answer)
            finally:
                service.close()
            _check(not problem, problem)
    # with the data read (pre-flight), the plan sizes activations by its longest prompt; every rank (data=False)
    # checks what does not depend on the sequences, so no launcher starts a job whose states cannot fit. A warning
    # (memory_check false) comes from node.sh's pre-flight, or from rank 0 under other launchers.
    _check_memory(cfg, placement, local_world_size, prompt_length=longest, activations=data,
                  announce=data or (os.environ.get("RANK", "0") == "0" and not os.environ.get("TGRPO_LOG_FILE")))
    if data:
        if cfg.retriever_url and cfg.retriever_on_failure == "fail":
            from tgrpo.rollout.retriever import connect

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
    """The model folder holds a config and a tokenizer that load, with a chat template, and weights (their files,
    not their values: nothing is loaded); returns the tokenizer."""
    from tgrpo.tiny import EMBEDDED

    _check(cfg.model in EMBEDDED or os.path.isfile(os.path.join(cfg.model, "config.json")),
           f"model '{cfg.model}' is not a model folder (no config.json there): give a local Hugging Face model folder "
           "(download it first on clusters without internet), 'tiny' or 'tiny-search'")
    from transformers import AutoConfig, AutoTokenizer

    folder = model_dir(cfg)
    try:
        AutoConfig.from_pretrained(folder)
        # without a vocabulary file transformers builds an empty tokenizer of the config's type (one token)
        vocabulary = any(os.path.isfile(os.path.join(folder, name)) for name in _VOCABULARIES)
        tokenizer = AutoTokenizer.from_pretrained(folder) if vocabulary else None
    except (OSError, ValueError, KeyError) as e:  # a corrupt config.json or tokenizer file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model '{cfg.model}' cannot be loaded ({first}): check its config.json and tokenizer "
                          "files, or download it again") from None
    _check(tokenizer is not None, f"model '{cfg.model}' has no tokenizer (no {' / '.join(_VOCABULARIES)} there): "
           "copy the model's tokenizer files (with tokenizer_config.json) into the folder, or download it again")
    _check(bool(tokenizer.chat_template), f"model '{cfg.model}' has a tokenizer without a chat template (no "
           "chat_template.jinja, none in tokenizer_config.json): take the model's instruct or chat version, or add "
           "a template to its tokenizer_config.json")
    _check_weights(f"model '{cfg.model}'", folder)
    return tokenizer


def _check_vision(cfg: Config):
    """A vision-language model's processor loads (with min_pixels/max_pixels), and the job uses nothing that does
    not take images yet; returns the VisionProcessor, or None for a text-only model."""
    from tgrpo.vision import VisionProcessor

    vision = VisionProcessor.load(model_dir(cfg), cfg.min_pixels, cfg.max_pixels)
    _check(vision is None or not cfg.retriever_url, f"model '{cfg.model}' is a vision-language model, and "
           "multi-turn tool episodes (retriever_url) do not take images yet: leave retriever_url empty, or take a "
           "text model")
    return vision


def _check_lora(cfg: Config) -> None:
    """use_lora: peft is installed, and the modules lora_target_modules names exist in the model (an empty copy on the meta device, from config.json: no weights read); peft would say so only once the
    engines had started."""
    if not cfg.use_lora:
        return
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError("use_lora needs the peft package: bash launch/setup.sh installs it (or pip install "
                          "peft==0.21.0)") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir(cfg))
    auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    names = [name for name, _ in model.named_modules()]
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    wanted = [t for t in cfg.lora_target_modules if t != "all-linear"]
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
    _check(not missing, f"lora_target_modules names {', '.join(missing)}, which model '{cfg.model}' does not have "
           f"(its linear layers: {', '.join(linear)}): name some of those, or all-linear")
    # vLLM (0.32 CPU) applies no adapter of peft's on the embeddings or the output head, and says nothing: the
    # engines would sample from another policy than the one trained (the sync check after step 1: logprobs 0.07
    # apart with lm_head, 4.3 with embed_tokens)
    heads = (model.get_input_embeddings(), model.get_output_embeddings())
    ends = {n for n, m in model.named_modules() if any(m is h for h in heads)}
    served = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in ends)]
    _check(served == wanted, f"lora_target_modules names {', '.join(t for t in wanted if t not in served)}, an "
           "embedding or the output head, which vLLM's LoRA does not serve: name the decoder's linear layers only "
           "(or all-linear, which leaves the head out)")


# a tokenizer's vocabulary: a fast tokenizer's, SentencePiece's, a BPE's (with merges.txt), a WordPiece's
_VOCABULARIES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _check_weights(what: str, folder: str) -> None:
    """The weights the engines and DeepSpeed will load are there, whole: a shard index names only files present,
    and each safetensors file is as long as its header says (a download cut short is not)."""
    files = sorted(os.listdir(folder))
    index = next((f for f in _INDEXES if f in files), None)
    if index is not None:
        try:
            with open(os.path.join(folder, index)) as f:
                weights = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{what} has a shard index {index} that cannot be read ({type(e).__name__}: "
                              f"{e}): download the model again") from None
        missing = [w for w in weights if not os.path.isfile(os.path.join(folder, w))]
        _check(not missing, f"{what} is missing {len(missing)} of the {len(weights)} weight files its {index} "
               f"names ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): download them again")
    else:
        weights = [f for f in files if f.endswith(".safetensors") or (f.startswith("pytorch_model") and
                                                                       f.endswith(".bin"))]
        _check(bool(weights), f"{what} has no weights (no *.safetensors or pytorch_model*.bin there): copy "
               "the model's weight files into the folder, or download it again")
    for weight in weights:
        if weight.endswith(".safetensors"):
            problem = _safetensors_problem(os.path.join(folder, weight))
            _check(problem is None, f"{what} has a damaged weight file {weight} ({problem}): download it again")


def _safetensors_problem(path: str) -> str | None:
    """What is wrong with a safetensors file, read from its header alone: an 8-byte length, a JSON header, then the
    tensors, whose offsets say how long the file must be."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            return f"{size} bytes, shorter than its header: cut off?"
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            return f"its header is not safetensors JSON: {type(e).__name__}"
    if 8 + length + end > size:
        return f"{size} bytes of the {8 + length + end} its header describes: cut off?"
    return None


def memory_plan(cfg: Config, placement: Placement, local_world_size: int | None = None, *,
                prompt_length: int | None = None, activations: bool = True):
    """This node's memory plan (tgrpo/job/memory.py) and what it is held against: (plan, one GPU's bytes or None,
    this host's total and available bytes); None where transformers cannot build the model's architecture."""
    import torch

    from tgrpo.job import memory

    on_gpu = torch.cuda.is_available()
    width = 4 if cfg.dtype == "float32" or (cfg.dtype == "auto" and not on_gpu) else 2
    try:
        shape = memory.model_shape(model_dir(cfg))
    except Exception:  # noqa: BLE001 - an architecture transformers cannot build here: left to the ranks to say
        return None
    local = local_world_size or placement.world_size
    node = int(os.environ.get("GROUP_RANK", os.environ.get("TGRPO_NODE_RANK", "0")))
    gpu_total = memory.gpu_memory() if on_gpu else None
    from tgrpo import reward_spec as reward

    try:  # rewards from models: the reward models' and the judge's parameters
        rm_params = sum(memory.model_shape(reward.resolve(cfg, m.entry)).params for m in reward.entries(cfg)
                        if m.entry != reward.JUDGE)
        judge_params = memory.model_shape(reward.judge_dir(cfg)).params if placement.judge else 0
    except Exception:  # noqa: BLE001 - an architecture transformers cannot build here: counted as nothing
        rm_params = judge_params = 0
    plan = memory.estimate(cfg, placement, shape, device="cuda" if on_gpu else "cpu", width=width,
                           gpu_total=gpu_total or 0.0, local_ranks=range(node * local, (node + 1) * local),
                           prompt_length=prompt_length, activations=activations, reward_params=rm_params,
                           judge_params=judge_params)
    return (plan, gpu_total, *memory.host_memory())


def _check_memory(cfg: Config, placement: Placement, local_world_size: int | None, *, prompt_length: int | None,
                  activations: bool, announce: bool) -> None:
    """The memory plan against this host's memory and one GPU's: one line naming what does not fit, by how much,
    and what to change; memory_check false turns the stop into a warning (if announce)."""
    from tgrpo import console
    from tgrpo.job import memory

    planned = memory_plan(cfg, placement, local_world_size, prompt_length=prompt_length, activations=activations)
    if planned is None:
        return
    plan, gpu_total, host_total, host_free = planned
    problems = []
    if plan.host_total > host_free:
        offloaded = sum(v for k, v in plan.host.items() if "offloaded" in k)
        what = (f"the optimizer on the CPU needs ~{offloaded / 1e9:.0f} GB of host memory (this host's ranks "
                f"~{plan.host_total / 1e9:.0f} GB: {memory.describe(plan.host)})" if offloaded > plan.host_total / 2
                else f"this host's ranks need ~{plan.host_total / 1e9:.0f} GB of memory ({memory.describe(plan.host)})")
        problems.append(f"{what}; this host has {host_total / memory.GiB:.0f} GiB, {host_free / memory.GiB:.0f} free: "
                        + _memory_fixes(plan.host, host=True))
    if gpu_total and plan.gpu_total > gpu_total:
        problems.append(f"a GPU needs ~{plan.gpu_total / 1e9:.0f} GB ({memory.describe(plan.gpu)}) but holds "
                        f"{gpu_total / memory.GiB:.0f} GiB: " + _memory_fixes(plan.gpu, host=False))
    if not problems:
        return
    message = "; and ".join(problems)
    if cfg.memory_check:
        raise ConfigError(f"{message} (memory_check false starts anyway)")
    if announce:
        console.warn_once(f"{message}; starting anyway, as memory_check is false")


def _memory_fixes(parts: dict[str, float], *, host: bool) -> str:
    """What would shrink the two largest components of a memory plan."""
    fixes = []
    for name, _ in sorted(parts.items(), key=lambda kv: -kv[1])[:2]:
        if "activations" in name or "logits" in name:
            fix = "set gradient_checkpointing true or a smaller max_tokens_per_micro_batch"
        elif "offloaded" in name:
            fix = ("shard the optimizer over more policy ranks (more GPUs or nodes), or keep it on the GPU "
                   "(offload_optimizer false) if the GPU can hold it")
        elif "engine" in name:
            fix = "lower vllm_gpu_memory_utilization" if not host else "run fewer engines on this host"
        elif "processes" in name:
            fix = "run fewer ranks on this host"
        else:
            fix = "shard the policy over more ranks" + ("" if host else " or set offload_optimizer true")
        if fix not in fixes:
            fixes.append(fix)
    return ", or ".join(fixes) + ", or take a smaller model"


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
