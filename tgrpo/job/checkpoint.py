"""Checkpoints (`output_dir/checkpoints/step-N`) that a run resumes from and that load in transformers and vLLM.

A checkpoint folder holds the policy as a Hugging Face model (weights, config, tokenizer: load it as it is), the
DeepSpeed state (`deepspeed/`: parameters, optimizer), every rank's RNG states (`rng/`) and `trainer_state.json`
(step, placement; the data position follows from the step, since a step's prompts depend only on (seed, step)).
With use_lora it holds the adapter instead of the model (peft's adapter_config.json and adapter_model.safetensors,
and the tokenizer; the base with the adapter merged in `merged/` with save_merged_lora), and the DeepSpeed state
holds the adapter's parameters and optimizer alone (the base is the model's, loaded again on resume).
It is written as `step-N.tmp`, `trainer_state.json` last, then renamed, and `latest` names it; the oldest beyond
save_total_limit are removed. Resume takes `latest` if it names a complete folder, else the highest complete
`step-N`: a folder cut off mid-write (a `.tmp`, or one without `trainer_state.json`) is never chosen.
Checkpoints of a multi-node job need output_dir on a filesystem every node sees.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import torch
import torch.distributed as dist

from tgrpo import console
from tgrpo.policy import deepspeed_engine
from tgrpo.sync import weights as sync

STATE = "trainer_state.json"
MANIFEST = "manifest.json"  # every file of the checkpoint and its size, written before STATE
LATEST = "latest"
STREAM = "rollout_stream.json"  # async_mode: each engine's groups fed, owed and dropped (tgrpo.rollout.stream)
CRITIC = "deepspeed-critic"  # advantage_estimator gae: the critic's DeepSpeed state
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE))


def file_hash(path: str) -> str:
    """xxh3-64 of a file's bytes (xxhash comes with datasets), read in 16 MiB chunks: a few GB/s, so a 1.5B
    checkpoint's ~20 GB hash in seconds where the disk keeps up."""
    import xxhash

    digest = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        chunk = bytearray(16 << 20)
        view = memoryview(chunk)
        while n := f.readinto(chunk):
            digest.update(view[:n])
    return digest.hexdigest()


def write_manifest(path: str) -> None:
    """Every file under path (but STATE and the manifest): its size in bytes and the xxh3-64 of its content."""
    files = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, path)
            if rel not in (STATE, MANIFEST):
                files[rel] = [os.path.getsize(full), file_hash(full)]
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump({"hash": "xxh3_64", "files": files}, f, indent=0, sort_keys=True)


def damage(path: str, content: bool = True) -> str | None:
    """What is wrong with a complete checkpoint's files against its manifest (a file missing, of another size, or,
    with content, whose bytes differ from those written), or None. Checkpoints written before manifests existed
    are taken as they are; those whose manifest has sizes only are checked by size."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return f"{MANIFEST} unreadable"
    files = manifest.get("files", manifest) if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return f"{MANIFEST} unreadable"
    entries = {rel: (entry if isinstance(entry, list) else [entry, None]) for rel, entry in files.items()}
    for rel, (size, _) in entries.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, {size} were written"
    if content:
        for rel, (_, digest) in entries.items():
            if digest is not None and file_hash(os.path.join(path, rel)) != digest:
                return f"{rel} holds other bytes than were written (its xxh3-64 differs)"
    return None


def _candidates(output_dir: str) -> list[str]:
    """The checkpoint folders, newest first: the one `latest` names, then by step."""
    root = checkpoints_dir(output_dir)
    candidates = []
    try:
        with open(os.path.join(root, LATEST)) as f:
            named = os.path.join(root, f.read().strip())
        if _STEP_DIR.match(os.path.basename(named)):
            candidates.append(named)
    except OSError:
        pass
    if os.path.isdir(root):
        steps = sorted(((int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.match(name))),
                       reverse=True)
        candidates += [os.path.join(root, name) for _, name in steps]
    return list(dict.fromkeys(candidates))


def newest(output_dir: str) -> str | None:
    """The newest complete checkpoint folder, its content unchecked (no file is read: fast enough for a failing
    run's last line), or None."""
    return next((path for path in _candidates(output_dir) if is_complete(path)), None)


def newest_by_size(output_dir: str) -> str | None:
    """The newest complete checkpoint whose files have the sizes its manifest lists (no content read: cheap enough
    for every rank's checks): the one `--resume auto` takes unless a file's content turns out damaged."""
    return next((path for path in _candidates(output_dir)
                 if is_complete(path) and damage(path, content=False) is None), None)


def nonfinite_advice(output_dir: str) -> str:
    """What to do about NaN/inf in the weights or gradients, the end of the line that stops such a run."""
    back = newest(output_dir)
    return ("likely NaN/inf in the weights or the optimizer state (a damaged checkpoint or model) or a learning rate "
            "too high; " + (f"the newest checkpoint to go back to: {back}" if back else
                            "no checkpoint to go back to: check the model and the learning rate"))


def find_latest(output_dir: str) -> str | None:
    """The newest complete and undamaged checkpoint folder, or None; a damaged newer one is skipped with a warning
    that names the file."""
    for path in _candidates(output_dir):
        if not is_complete(path):
            continue
        problem = damage(path)
        if problem is None:
            return path
        console.warn_once(f"checkpoint {path} is damaged ({problem}): resuming from an older one")
    return None


def check_output_dir(cfg) -> None:
    """Before start-up: output_dir can be written, and a fresh run does not write over a previous one."""
    from tgrpo.errors import ConfigError

    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
        probe = os.path.join(cfg.output_dir, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"output_dir '{cfg.output_dir}' cannot be written ({e.strerror or type(e).__name__}): "
                          "choose a folder this user can write, e.g. --output_dir ./output") from None
    if not cfg.resume and not cfg.overwrite_output_dir and (found := previous_run(cfg.output_dir)):
        raise ConfigError(f"output_dir {cfg.output_dir} holds a previous run ({found}): continue it with --resume "
                          "auto, start over with --overwrite_output_dir true, or choose another --output_dir")


def previous_run(output_dir: str) -> str | None:
    """What shows that a run wrote into output_dir ("metrics.jsonl", "checkpoints/"), or None."""
    metrics = os.path.join(output_dir, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        return "metrics.jsonl"
    root = checkpoints_dir(output_dir)
    if os.path.isdir(root) and os.listdir(root):
        return "checkpoints/"
    return None


def clear_previous_run(output_dir: str) -> None:
    """overwrite_output_dir: what a previous run wrote (its logs/ stay: this run's node log may be there)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        if os.path.exists(os.path.join(output_dir, name)):
            os.unlink(os.path.join(output_dir, name))
    for name in ("checkpoints", "tensorboard", "wandb"):
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def resume_path(cfg) -> str | None:
    """The checkpoint a run continues from: cfg.resume itself (its content checked: one ConfigError line if it was
    damaged), the newest complete and undamaged one for 'auto' (said in one line when every checkpoint there is
    damaged and the run starts over), or None."""
    from tgrpo.errors import ConfigError

    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        found = find_latest(cfg.output_dir)
        root = checkpoints_dir(cfg.output_dir)
        if found is None and os.path.isdir(root) and any(_STEP_DIR.match(n) for n in os.listdir(root)):
            console.warn_once(f"no complete, undamaged checkpoint in {root}: starting over from step 0")
        return found
    problem = damage(cfg.resume)
    if problem is not None:
        raise ConfigError(f"checkpoint '{cfg.resume}' is damaged ({problem}): name an older one or use 'auto', "
                          "which skips damaged checkpoints")
    return os.path.abspath(cfg.resume)


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE)) as f:
        return json.load(f)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(job, step: int) -> str:
    """Every rank calls this at the same point. The sync source (first policy rank) owns the folder. Weights that
    hold NaN/inf are never saved: every rank raises JobError instead, the folder removed."""
    from tgrpo.errors import JobError

    cfg, rank = job.cfg, job.rank
    final = os.path.join(checkpoints_dir(cfg.output_dir), f"step-{step}")
    tmp = final + ".tmp"
    if job.is_source:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
    dist.barrier(group=job.groups.data)
    nonfinite = 0
    if job.policy is not None:
        # DeepSpeed's state first: its save settles ZeRO-3's parameters (a gather right after the step's last
        # forward met parameters still in flight); the weights are checked as the HF model gathers them
        deepspeed_engine.save_state(job.policy.engine, os.path.join(tmp, "deepspeed"), frozen=not cfg.use_lora)
        if cfg.use_lora:
            nonfinite = export_adapter(job.policy.model, job.plan, job.adapter_config, job.model_dir, tmp,
                                       is_writer=job.is_source, merged=cfg.save_merged_lora, cfg=cfg)
        else:
            nonfinite = export_hf(job.policy.model, job.export_plan or job.plan, job.model_dir, tmp,
                                  is_writer=job.is_source, cfg=job.cfg)
    box = [nonfinite]
    dist.broadcast_object_list(box, group=job.groups.data, src=job.placement.sync_source)
    if box[0]:
        if job.is_source:
            shutil.rmtree(tmp, ignore_errors=True)
        raise JobError(f"step {step}: the policy's weights hold {box[0]} NaN/inf values, not saved: the run "
                       f"stops; {nonfinite_advice(cfg.output_dir)}")
    if job.critic is not None:  # advantage_estimator gae: the critic's parameters and optimizer
        deepspeed_engine.save_state(job.critic.engine, os.path.join(tmp, CRITIC))
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank{rank}.pt"))
    streams = None
    if cfg.async_mode:  # every engine's groups: the next to feed, those owed (in flight or ready) and dropped
        everyone = [None] * dist.get_world_size(job.groups.data)
        dist.all_gather_object(everyone, job.stream.state() if job.stream is not None else None, job.groups.data)
        streams = [x for x in everyone if x is not None]
    dist.barrier(group=job.groups.data)
    if job.is_source:
        if streams is not None:
            with open(os.path.join(tmp, STREAM), "w") as f:
                json.dump(streams, f)
        placement = job.placement
        write_manifest(tmp)
        with open(os.path.join(tmp, STATE), "w") as f:
            json.dump({"step": step, "world_size": placement.world_size, "rollout": list(placement.rollout),
                       "policy": list(placement.policy), "reference": list(placement.reference),
                       "critic": list(placement.critic), "colocated": placement.colocated, "seed": cfg.seed,
                       "advantage_estimator": cfg.advantage_estimator, "kl_coef": job.kl.value,
                       "use_lora": cfg.use_lora,
                       "reward_norms": {name: norm.state() for name, norm in job.reward_norms.items()}}, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_latest(cfg.output_dir, os.path.basename(final))
        _prune(cfg.output_dir, cfg.save_total_limit)
    return final


def read_stream(path: str) -> list[dict] | None:
    """async_mode: every engine's rollout stream as the checkpoint recorded it (None: saved by a synchronous run)."""
    file = os.path.join(path, STREAM)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def load(job, path: str) -> int:
    """Restore the policy's DeepSpeed state and this rank's RNG from a checkpoint; returns its step. Every rank
    calls it; the engines get the weights by the sync that follows."""
    state = read_state(path)
    if job.policy is not None:
        deepspeed_engine.load_state(job.policy.engine, os.path.join(path, "deepspeed"), frozen=not job.cfg.use_lora)
    if job.critic is not None:
        deepspeed_engine.load_state(job.critic.engine, os.path.join(path, CRITIC))
    if "kl_coef" in state:
        job.kl.value = float(state["kl_coef"])
    if job.reward_norms and state.get("reward_norms"):  # reward_model_normalize running: the stats so far
        from tgrpo.reward.model import RunningNorm

        job.reward_norms = {name: RunningNorm(state["reward_norms"].get(name)) for name in job.reward_norms}
    rng = os.path.join(path, "rng", f"rank{job.rank}.pt")
    if os.path.isfile(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    return int(state["step"])


def check_resumable(path: str, placement, critic_expected: bool = False, use_lora: bool = False) -> None:
    """Raise ValueError naming the difference if the checkpoint was written by another placement, or with(out) a
    LoRA adapter when this run trains without (with) one."""
    state = read_state(path)
    if bool(state.get("use_lora", False)) != use_lora:
        written = "a LoRA adapter (use_lora true)" if state.get("use_lora") else "every weight (use_lora false)"
        raise ValueError(f"checkpoint {path} was written by a run training {written}: resume it with use_lora "
                         f"{str(not use_lora).lower()}, or start over")
    now = {"world_size": placement.world_size, "rollout": list(placement.rollout), "policy": list(placement.policy),
           "reference": list(placement.reference), "critic": list(placement.critic),
           "colocated": placement.colocated}
    if critic_expected and not os.path.isdir(os.path.join(path, CRITIC)):
        raise ValueError(f"checkpoint {path} holds no critic ({CRITIC}/): it was written by a run without "
                         "advantage_estimator gae; resume it with the estimator that wrote it")
    for key, value in now.items():
        if state.get(key, [] if key == "critic" else None) != value:
            raise ValueError(f"checkpoint {path} was written with {key}={state.get(key)}, this run has {value}: "
                             "resume with the placement that wrote it")


def _write_latest(output_dir: str, name: str) -> None:
    root = checkpoints_dir(output_dir)
    tmp = os.path.join(root, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
    os.replace(tmp, os.path.join(root, LATEST))


def _prune(output_dir: str, keep: int) -> None:
    """Remove the oldest complete checkpoints beyond the newest `keep` (0 keeps all)."""
    if keep <= 0:
        return
    root = checkpoints_dir(output_dir)
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.match(name)))
    for _, name in steps[:-keep]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def export_hf(model: torch.nn.Module, plan: list, model_dir: str, dest: str, is_writer: bool, cfg=None) -> int:
    """The policy as a Hugging Face model in dest, with its tokenizer (and a vision-language model's processor,
    with the run's min_pixels/max_pixels). Every policy rank calls it (the ZeRO-3 gather is a collective);
    the writer alone copies and writes, unless the weights hold NaN/inf: it then writes nothing and returns how many
    values are NaN/inf (counted on the gathered buckets, as they pass). Returns 0 on other ranks."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoTokenizer

    state: dict[str, torch.Tensor] = {}
    nonfinite = 0
    for bucket, flat in sync.iter_gathered_buckets(model, plan, torch.device("cpu"), fill=is_writer):
        if is_writer:
            if flat.is_floating_point():
                nonfinite += int(flat.numel() - torch.isfinite(flat).sum())
            for name, shape, offset, numel in bucket.params:
                state[name] = flat[offset:offset + numel].view(shape).clone()
    if not is_writer or nonfinite:
        return nonfinite
    save_torch_state_dict(state, dest)
    model.config.save_pretrained(dest)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(dest)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(dest)
    _save_processor(model_dir, dest, cfg)
    return 0


def _save_processor(model_dir: str, dest: str, cfg) -> None:
    """A vision-language model's processor beside its weights, as the run used it."""
    from tgrpo import vision

    processor = vision.VisionProcessor.load(model_dir, cfg.min_pixels if cfg else 0, cfg.max_pixels if cfg else 0)
    if processor is not None:
        processor.save(dest)


def export_adapter(model: torch.nn.Module, plan: list, config: dict, model_dir: str, dest: str, is_writer: bool,
                   merged: bool = False, cfg=None) -> int:
    """use_lora: the adapter in peft's format in dest (adapter_config.json, adapter_model.safetensors: it loads with
    PeftModel.from_pretrained and as a vLLM LoRA) with the tokenizer (and a vision-language model's processor, as
    export_hf), and with merged the base with the adapter merged in dest/merged (with them too). Every policy rank
    calls it (plan: the adapter's parameters, gathered as export_hf gathers); NaN/inf values are counted and nothing
    written, as there. Returns 0 on other ranks."""
    from transformers import AutoTokenizer

    from tgrpo.policy import lora

    state: dict[str, torch.Tensor] = {}
    nonfinite = 0
    for bucket, flat in sync.iter_gathered_buckets(model, plan, torch.device("cpu"), fill=is_writer):
        if is_writer:
            nonfinite += int(flat.numel() - torch.isfinite(flat).sum())
            for name, shape, offset, numel in bucket.params:
                state[name] = flat[offset:offset + numel].view(shape).clone()
    if not is_writer or nonfinite:
        return nonfinite
    lora.save_adapter(state, config, dest)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(dest)
    _save_processor(model_dir, dest, cfg)
    if merged:
        with deepspeed_engine.without_zero_init():
            lora.save_merged(dest, model_dir, os.path.join(dest, "merged"), next(iter(state.values())).dtype)
        _save_processor(model_dir, os.path.join(dest, "merged"), cfg)
    return 0
