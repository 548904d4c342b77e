"""What reward_funcs names besides rules and functions: reward models (a folder of a sequence classifier, or the
embedded tiny-rm) and the LLM judge ('judge'); which entries they are, their folders, and what a reward model or a
judge reads of a prompt. A shared leaf: the rollout ranks leave these entries out, the checks check them, the job
(tgrpo.job.model_rewards) scores them with tgrpo.reward."""
from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass

from tgrpo.errors import ConfigError

JUDGE = "judge"
EMBEDDED_RM = "tiny-rm"


@dataclass(frozen=True)
class ModelReward:
    entry: str     # as reward_funcs names it: a folder, 'tiny-rm' or 'judge'
    name: str      # in the metrics and reward_parts: the folder's base name, or 'judge'
    weight: float
    index: int     # its place in reward_funcs


def is_reward_model(entry: str) -> bool:
    """A reward_funcs entry that names a model folder (or the embedded tiny-rm) rather than a rule or a function."""
    return entry == EMBEDDED_RM or (":" not in entry and os.path.isfile(os.path.join(entry, "config.json")))


def entries(cfg) -> list[ModelReward]:
    """The model rewards of reward_funcs, in order: reward models and the judge."""
    out = []
    for i, (entry, weight) in enumerate(zip(cfg.reward_funcs, cfg.reward_weights)):
        if entry == JUDGE:
            out.append(ModelReward(entry, JUDGE, float(weight), i))
        elif is_reward_model(entry):
            out.append(ModelReward(entry, os.path.basename(os.path.normpath(entry)), float(weight), i))
    return out


def resolve(cfg, entry: str) -> str:
    """A reward model's folder: the entry itself, or the embedded tiny-rm built into the cache."""
    if entry == EMBEDDED_RM:
        from tgrpo.tiny import ensure_reward_model

        return ensure_reward_model(cfg.cache_dir)
    return entry


def judge_dir(cfg) -> str:
    if cfg.judge_model == "tiny-judge":
        from tgrpo.tiny import ensure_judge_model

        return ensure_judge_model(cfg.cache_dir)
    return cfg.judge_model


def check_reward_model_folder(path: str) -> str:
    """'' if the folder holds a sequence classifier with one label, else one line naming the problem and the fix."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        return f"reward model '{path}': cannot read its config.json ({e})"
    archs = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        return (f"reward model '{path}' is a {', '.join(archs) or 'model of no named architecture'}, not an "
                "...ForSequenceClassification: give a reward model's folder (a sequence classifier with one label), "
                "or serve a causal LM as the judge (reward_funcs 'judge', judge_model)")
    labels = config.get("num_labels", len(config.get("id2label") or {0: 0}))
    if labels != 1:
        return (f"reward model '{path}' has {labels} labels: a reward model scores with one (num_labels 1); "
                "multi-objective heads (ArmoRM's) need their own scoring function")
    return ""


def conversation(prompt, completion: str) -> list[dict]:
    """The chat a reward model or judge reads: the dataset's prompt (its messages, text parts only; or a string as a
    user message) and the completion as the assistant's answer."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [{"role": m["role"], "content": _text(m.get("content", ""))} for m in prompt]
    return messages + [{"role": "assistant", "content": completion}]


def prompt_text(prompt) -> str:
    """The prompt's user text for a judge template's {prompt}: the last user message's text parts."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m.get("role") == "user"] or list(prompt)
    return _text(users[-1].get("content", "")) if users else ""


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def template_fields(template: str) -> list[str]:
    """The names a judge template fills ('{prompt}' -> 'prompt'); ConfigError if it is not a format string."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ConfigError(f"judge_template is not a format string ({e}): write fields as {{prompt}}, {{completion}}, "
                          "{answer} or a column's name, and double literal braces ({{ }})") from None
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise ConfigError(f"judge_template has the field '{{{bad[0]}}}': name a column, {{prompt}}, {{completion}} "
                          "or {answer}, and double literal braces ({{ }})")
    return names


def verdict_ids(tokenizer, words: list[str], model_dir: str) -> tuple[int, int]:
    """The token ids of the two verdict words (each must be one token of the judge's tokenizer)."""
    if len(words) != 2:
        raise ConfigError(f"judge_verdict_tokens needs two words (good, then bad), got {words}")
    ids = []
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) != 1:
            raise ConfigError(f"judge verdict word '{word}' is {len(encoded)} tokens of {model_dir}'s tokenizer: "
                              "give words that are one token each (judge_verdict_tokens), or judge_parser score")
        ids.append(encoded[0])
    return ids[0], ids[1]
