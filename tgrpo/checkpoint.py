"""HF-format checkpoints of the policy (`output/checkpoints/step-N`) that load in transformers and in vLLM.

Written to a temporary folder and renamed, so a folder named step-N is always complete.
"""
from __future__ import annotations

import os
import shutil

import torch

from tgrpo import sync


def save_hf(model: torch.nn.Module, plan: list, model_dir: str, out_dir: str, step: int, is_writer: bool) -> str:
    """Called by every policy rank (the ZeRO-3 gather is a collective); the writer alone copies and writes."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoTokenizer

    state: dict[str, torch.Tensor] = {}
    for bucket, flat in sync.iter_gathered_buckets(model, plan, torch.device("cpu"), fill=is_writer):
        if is_writer:
            for name, shape, offset, numel in bucket.params:
                state[name] = flat[offset:offset + numel].view(shape).clone()
    final = os.path.join(out_dir, "checkpoints", f"step-{step}")
    if not is_writer:
        return final
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_torch_state_dict(state, tmp)
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
