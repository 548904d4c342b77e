"""LoRA (use_lora): the adapter built with peft, which of the policy's parameters are the adapter, and its tensors
under the names of peft's file format, which PeftModel.from_pretrained and vLLM's LoRA loader read.

The policy is peft's model around the frozen base: only the adapter has gradients and
optimizer state. The engines keep the base they loaded at start and get the adapter's tensors each sync (no file),
from which vLLM builds a new adapter (tgrpo.rollout.vllm_engine.WeightReceiver); checkpoints hold adapter_config.json and
adapter_model.safetensors.
"""
from __future__ import annotations

import json
import os

import torch

ADAPTER = "default"  # peft's name of the one adapter
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank choices


def peft_config(cfg, vision: bool = False):
    """peft's LoraConfig from our options. vision (a vision-language model): the adapter on the language model
    alone, never on the vision tower (the engines serve adapters on the language model)."""
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules="all-linear" if targets == ["all-linear"] else targets,
                      exclude_modules=r".*\bvisual\b.*" if vision else None)


def wrap(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """The model with a fresh adapter (lora_B zero: the policy starts as the base); every other weight frozen."""
    from peft import get_peft_model

    # lora_A is drawn at random (peft's Kaiming init); from cfg.seed, so that runs with one seed start from one
    # adapter (torch's default generator is seeded at random in every process)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, peft_config(cfg, vision=getattr(model.config, "vision_config", None) is not None))


def is_adapter(name: str, param: torch.nn.Parameter) -> bool:
    """A parameter the adapter trains (its A and B matrices)."""
    return param.requires_grad


def file_name(name: str, adapter: str = ADAPTER) -> str:
    """A parameter's name in peft's file format: the adapter's name dropped, modules_to_save's copy named as the
    module ('...q_proj.lora_A.default.weight' -> '...q_proj.lora_A.weight'; '...lm_head.modules_to_save.default
    .weight' -> '...lm_head.weight'), as peft's get_peft_model_state_dict writes them."""
    name = name.replace(f".modules_to_save.{adapter}.", ".")
    name = name.replace(f".{adapter}.", ".")
    return name.removesuffix(f".{adapter}")


def config_dict(model: torch.nn.Module) -> dict:
    """The adapter's config as adapter_config.json holds it, target modules resolved ('all-linear' made a list)."""
    config = model.peft_config[ADAPTER].to_dict()
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def vllm_max_rank(r: int) -> int:
    """The smallest of vLLM's max_lora_rank sizes that serves rank r."""
    return next(size for size in VLLM_RANKS if size >= r)


def save_adapter(tensors: dict[str, torch.Tensor], config: dict, dest: str) -> None:
    """adapter_config.json and adapter_model.safetensors in dest; tensors keyed by the policy's parameter names."""
    from safetensors.torch import save_file

    os.makedirs(dest, exist_ok=True)
    save_file({file_name(n): t.contiguous() for n, t in tensors.items()}, os.path.join(dest, WEIGHTS_FILE))
    with open(os.path.join(dest, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)


def save_merged(adapter_dir: str, base_dir: str, dest: str, dtype: torch.dtype) -> None:
    """The base with the adapter of adapter_dir merged in, as a plain Hugging Face model in dest (on the CPU). One
    rank calls it alone: under ZeRO-3, wrap it in deepspeed_engine.without_zero_init()."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoTokenizer

    from tgrpo.policy import modeling

    base = modeling.load_kwargs(AutoConfig.from_pretrained(base_dir), "sdpa")[0].from_pretrained(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(dest)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(dest)
