"""Prompts: loaded with `datasets`, checked row by row, put through the chat template, handed out per step.

The order is a deterministic shuffle per epoch, so the prompts of step s depend only on (seed, s): a resumed run
continues with the same prompts, and rollout rank i takes the i-th slice of the step's prompts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from tgrpo.config import ConfigError


@dataclass
class Prompt:
    prompt_ids: list[int]
    prompt_text: str
    answer: str


def _load_rows(path: str):
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset("json", data_files=path, split="train")
    except Exception as e:  # datasets wraps parse errors in several types; the first line says what broke
        raise ConfigError(f"train_data '{path}' could not be read as JSON rows: {str(e).splitlines()[0]}") from None


def _messages(value, row: int, cfg) -> list[dict]:
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and m.get("role") and
                                                 isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ConfigError(f"train_data row {row}: '{cfg.prompt_column}' holds no prompt (want a list of "
                      "{role, content} messages or a string): fix the row or set --prompt_column")


def load_prompts(cfg, tokenizer) -> tuple[list[Prompt], int]:
    """All usable prompts and the number dropped for being longer than max_prompt_length."""
    rows = _load_rows(cfg.train_data)
    for column in (cfg.prompt_column, cfg.answer_column):
        if column not in rows.column_names:
            raise ConfigError(f"train_data '{cfg.train_data}' has no column '{column}' (columns: {rows.column_names})"
                              ": set --prompt_column / --answer_column")
    prompts, dropped = [], 0
    for i, row in enumerate(rows):
        messages = _messages(row[cfg.prompt_column], i, cfg)
        answer = row[cfg.answer_column]
        if answer is None or not str(answer).strip():
            raise ConfigError(f"train_data row {i}: no answer in '{cfg.answer_column}': every row needs one")
        if cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}] + messages
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.max_prompt_length:
            dropped += 1
            continue
        prompts.append(Prompt(ids, text, str(answer)))
    if len(prompts) < cfg.prompts_per_step:
        raise ConfigError(f"train_data has {len(prompts)} usable prompts ({dropped} longer than max_prompt_length="
                          f"{cfg.max_prompt_length}), fewer than prompts_per_step={cfg.prompts_per_step}")
    return prompts, dropped


def step_indices(num_prompts: int, prompts_per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts of `step` (0-based): a fresh seeded shuffle for every epoch."""
    orders: dict[int, list[int]] = {}
    out = []
    for position in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, offset = divmod(position, num_prompts)
        if epoch not in orders:
            orders[epoch] = list(range(num_prompts))
            random.Random(seed * 1_000_003 + epoch).shuffle(orders[epoch])
        out.append(orders[epoch][offset])
    return out


def rank_slice(items: list, index: int, parts: int) -> list:
    """The index-th of `parts` equal contiguous slices."""
    size = len(items) // parts
    return items[index * size:(index + 1) * size]
