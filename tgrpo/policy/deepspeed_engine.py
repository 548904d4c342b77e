"""Every call into DeepSpeed lives here (pinned: deepspeed 0.19.8).

The policy (and, with beta > 0, the frozen reference) are ZeRO-3 engines over the policy group, which each policy
rank has made its default group before calling in here (see distributed.make_default_group).

Updates are guarded (`backward`, `step`): one whose loss or gradient norm is NaN/inf is skipped on every rank alike,
the weights and the optimizer state left as they were.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch

# transformers' ZeRO-3 hook reads this object while it is alive: from_pretrained then loads each weight straight
# into its partition (deepspeed.zero.Init) instead of materialising the whole model on every rank.
_hf_ds_configs: list = []


def load_config(path: str, cfg, *, zero_stage: int, bf16: bool, dp_size: int, hidden_size: int,
                trainable: bool) -> dict:
    """The DeepSpeed JSON with its "auto" values filled from our config, the ZeRO stage the placement resolved
    (Placement.zero_stage) and the model's width, as the HF Trainer does. The policy rank decides its own micro-batches (a token budget, so their number varies from step to step):
    DeepSpeed's accumulation is unmanaged, every backward adds to the gradients and each step() is the boundary."""
    with open(path) as f:
        ds = json.load(f)
    fill = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": dp_size,
            "gradient_clipping": cfg.max_grad_norm}
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bf16
    # ZeRO-1/2 in bfloat16 skip an update whose gradient norm is NaN/inf only with this on; step() relies on it
    ds["bf16"]["check_grad_overflow"] = True
    zero = ds.setdefault("zero_optimization", {})
    stage = zero_stage if trainable else (3 if zero_stage == 3 else 0)  # a frozen model has no optimizer
    if zero.get("stage", "auto") not in ("auto", zero_stage):
        raise ValueError(f"{path} sets zero_optimization.stage {zero['stage']} but zero_stage is {zero_stage}: "
                         'set "stage": "auto" there and choose it with zero_stage')
    zero["stage"] = stage
    if stage == 3:
        sized = {"reduce_bucket_size": hidden_size * hidden_size,
                 "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                 # one rank holds every parameter whole anyway: kept gathered, ZeRO-3 has nothing to fetch or
                 # release around each module (measured on an H200: the hooks halved a 1.5B policy's speed)
                 "stage3_param_persistence_threshold": 10 * hidden_size if dp_size > 1 else 1 << 62}
        for key, value in sized.items():
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    else:
        for key in [k for k in zero if k.startswith("stage3_")]:
            del zero[key]
        if zero.get("reduce_bucket_size") == "auto":
            zero["reduce_bucket_size"] = int(5e8)
        if stage < 2:
            zero["overlap_comm"] = False  # unmanaged accumulation overlaps communication from stage 2 on
    if trainable:
        ds["managed_gradient_accumulation"] = False
        if cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    ds.pop("optimizer", None)  # we pass our AdamW; a JSON optimizer would need DeepSpeed's fused ops on CPU
    ds.pop("scheduler", None)
    return ds


def build_engine(model_dir: str, ds_config: dict, dtype: torch.dtype, *, trainable: bool, attention: str,
                 lr: float = 0.0, weight_decay: float = 0.0, gradient_checkpointing: bool = False,
                 lr_schedule=None, value_head: bool = False, adapter=None, freeze_vision_tower: bool = False):
    """A DeepSpeed engine of the model; trainable: with AdamW (DeepSpeed's CPU Adam when the optimizer is offloaded)
    and lr_schedule(optimizer), a scheduler that engine.step() steps and checkpoints save and restore. value_head:
    the model's body with a new scalar head instead of its LM head (a critic: AutoModelForTokenClassification with
    one label, no dropout). adapter: a function that wraps the loaded model in a LoRA adapter (tgrpo.policy.lora.wrap); the
    optimizer then holds the adapter's parameters alone and the frozen base gets no gradients. A vision-language
    model loads as modeling.load_kwargs says; freeze_vision_tower keeps its tower out of the optimizer."""
    import deepspeed
    from transformers import AutoConfig, AutoModelForTokenClassification
    from transformers.integrations import HfDeepSpeedConfig

    from tgrpo.policy import modeling

    # Binds deepspeed.comm to the torch.distributed state we made; its world is then the policy group.
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    _hf_ds_configs.append(HfDeepSpeedConfig(ds_config))
    with _launcher_world_is_default_group():
        vision = modeling.is_vision(AutoConfig.from_pretrained(model_dir))
        if value_head and not vision:
            config = AutoConfig.from_pretrained(model_dir, num_labels=1, classifier_dropout=0.0)
            model = AutoModelForTokenClassification.from_pretrained(model_dir, config=config, dtype=dtype,
                                                                    attn_implementation=attention)
        else:
            auto, kwargs = modeling.load_kwargs(AutoConfig.from_pretrained(model_dir), attention)
            model = auto.from_pretrained(model_dir, dtype=dtype, **kwargs)
            if value_head:  # transformers has no token classifier of a vision-language model: its LM head swapped
                modeling.value_head(model)
        model.config.use_cache = False
        if freeze_vision_tower and modeling.vision_tower(model) is not None:
            modeling.vision_tower(model).requires_grad_(False)
        if adapter is not None:
            model = adapter(model)
        if not trainable:
            model.eval()
            model.requires_grad_(False)
            return deepspeed.initialize(model=model, config=ds_config)[0]
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trained = [p for p in model.parameters() if p.requires_grad]
        if "offload_optimizer" in ds_config["zero_optimization"]:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(trained, lr=lr, weight_decay=weight_decay, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay)
        return deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                    lr_scheduler=lr_schedule)[0]  # called with the optimizer DeepSpeed steps


@contextlib.contextmanager
def _launcher_world_is_default_group():
    """DeepSpeed's zero.Init refuses a one-rank group when the launcher's WORLD_SIZE is larger (it takes that for
    a mistake). Here the one-rank policy group is the intended world: say so for the length of the call."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(torch.distributed.get_world_size())
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved


@contextlib.contextmanager
def without_zero_init():
    """A model that one rank loads alone (a checkpoint's merged export): transformers' ZeRO-3 hook off meanwhile.
    The policy's HfDeepSpeedConfig is alive in this process, so from_pretrained would partition the model with
    zero.Init, a collective the other policy ranks never join (seen: the save hung at ZeRO-3)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def full_shape(param: torch.nn.Parameter) -> list[int]:
    """The whole parameter's shape: a ZeRO-3 partitioned parameter reports numel() == 0 outside a gather."""
    return list(getattr(param, "ds_shape", param.shape))


def gathered(params: list[torch.nn.Parameter]):
    """Context in which every listed parameter is whole on every policy rank; a collective over the policy group."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def local_partition(param: torch.nn.Parameter, parts: int) -> torch.Tensor:
    """This rank's ZeRO-3 shard of a parameter, flat: rank r holds elements [r*n, (r+1)*n) of the parameter
    flattened and zero-padded to parts*n, n = ceil(numel / parts) (DeepSpeed's partition layout)."""
    numel = param.ds_numel
    expected = -(-numel // parts)
    shard = param.ds_tensor
    if shard.ds_numel != expected or shard.numel() != expected:
        raise RuntimeError(f"ZeRO-3 shard of a {numel}-element parameter holds {shard.numel()} elements, not "
                           f"ceil({numel}/{parts}) = {expected} (parameters offloaded to NVMe, or a partition "
                           "group other than the policy group): set sync_mode gather")
    return shard.data.view(-1)


def shard_offsets(params: list[torch.nn.Parameter]) -> tuple[torch.Tensor, list[int]] | None:
    """When every parameter's ZeRO-3 shard is a view into one buffer (DeepSpeed packs the shards of parameters that
    stay on the device into one flat buffer), that buffer as one flat tensor and each shard's offset in it (in
    elements); None otherwise (offloaded parameters, mixed dtypes)."""
    shards = [p.ds_tensor for p in params]
    dtype, device = shards[0].dtype, shards[0].device
    storage = shards[0].untyped_storage()
    if any(s.dtype != dtype or s.untyped_storage().data_ptr() != storage.data_ptr() or not s.is_contiguous()
           for s in shards):
        return None
    flat = torch.empty(0, dtype=dtype, device=device).set_(storage, 0, (storage.nbytes() // dtype.itemsize,))
    return flat, [s.storage_offset() for s in shards]


def save_state(engine, path: str, frozen: bool = True) -> None:
    """Parameters and optimizer state of a ZeRO-3 engine (every rank of its group writes its shard). frozen=False:
    without the parameters that do not train (a LoRA policy's base, which a resumed run loads from the model)."""
    engine.save_checkpoint(path, tag="state", save_latest=False, exclude_frozen_parameters=not frozen)


def load_state(engine, path: str, frozen: bool = True) -> None:
    """frozen=False: the state was saved without the frozen parameters, which stay as the model loaded them."""
    loaded, _ = engine.load_checkpoint(path, tag="state", load_optimizer_states=True,
                                       load_lr_scheduler_states=True, load_module_strict=frozen)
    if loaded is None:
        raise RuntimeError(f"no DeepSpeed state in {path}")


def backward(engine, loss: torch.Tensor) -> None:
    """Add this micro-batch's gradients (DeepSpeed's accumulation is ours: no scaling by its accumulation steps). A
    non-finite loss is backed as NaN, so that every gradient it reaches is NaN and `step` skips the update: its
    graph alone could hand back finite gradients (a clamp or a mask passes zero where the forward held a NaN). The
    guard is a device op, so the host does not wait on it."""
    guard = torch.where(torch.isfinite(loss), 1.0, float("nan")).to(loss.dtype)
    engine.backward(loss * guard, scale_wrt_gas=False)


def step(engine) -> bool:
    """The optimizer step of the gradients added since the last one; False when it was skipped because the gradient
    norm was NaN/inf (the gradients dropped, the weights, the optimizer state and the learning-rate schedule left as
    they were). Every rank of the engine's group gets the same answer.

    DeepSpeed's ZeRO optimizers and its bfloat16/fp16 wrappers check the norm themselves, over the group, and skip
    such an update (the wrapper's `overflow`); engine.was_step_applied() is then False (with unmanaged accumulation
    every step() is a boundary, so the verdict is this call's). Our plain AdamW without ZeRO (stage 0 in float32)
    has no such check: DeepSpeed would apply a NaN gradient, so the gradients are checked here first, on every rank
    (at stage 0 they are reduced only inside step()), and the update is skipped as DeepSpeed would skip it."""
    if hasattr(engine.optimizer, "overflow"):
        engine.step()
        return engine.was_step_applied()
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    bad = ((~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float() if grads else
           torch.zeros((), device=next(engine.module.parameters()).device))
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX, group=engine.data_parallel_group)
    if bad.item() == 0:
        engine.step()
        return True
    engine.zero_grad()
    engine.skipped_steps += 1  # DeepSpeed's own count of skipped updates, saved in its checkpoints
    return False


def learning_rate(engine) -> float:
    """The learning rate of the engine's next optimizer step."""
    return float(engine.get_lr()[0])


def grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else 0.0
