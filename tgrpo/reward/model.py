"""A sequence-classification reward model (num_labels 1: Skywork-Reward, internlm2-reward and the like) scoring
completions with its own tokenizer and chat template, batched by a token budget, in the job's dtype (bf16 on GPU).

TRL's rule: the prompt's messages and the completion as the assistant's turn, rendered by the reward model's chat
template (its tokenizer has one) and tokenized without special tokens added; without a chat template the prompt's
text and the completion, tokenized as the tokenizer does by default. The score is the model's logit (at the last
non-pad token, as transformers' ...ForSequenceClassification picks it)."""
from __future__ import annotations

import torch

from tgrpo.reward_spec import conversation


class RewardModel:
    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, batch_tokens: int, max_length: int,
                 offload: bool = False):
        """offload: between uses the weights wait in host memory (a GPU shared with the policy, which trains
        meanwhile)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.path, self.device, self.batch_tokens, self.max_length = path, device, batch_tokens, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
        if model.config.pad_token_id is None:  # the last real token is found by the pad id
            model.config.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
                else self.tokenizer.eos_token_id
        self.pad = model.config.pad_token_id
        self.offload = offload and device.type == "cuda"
        self.model = model.eval().requires_grad_(False).to("cpu" if self.offload else device)
        self.on_device = not self.offload
        self.last_truncated: list[bool] = []  # of the last score()'s inputs: cut to max_length (last tokens kept)

    def encode(self, prompt, completion: str, cut: bool = True) -> list[int]:
        """The reward model's token ids of one (prompt, completion), by TRL's rule (module docstring), cut to the
        last max_length (cut)."""
        messages = conversation(prompt, completion)
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
        return ids[-self.max_length:] if cut else ids

    def batches(self, encoded: list[list[int]]):
        """(indices into encoded, input_ids, attention_mask) of each batch: longest first (few pads), at most
        batch_tokens tokens with padding, right-padded, on the CPU."""
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        start = 0
        while start < len(order):
            width = len(encoded[order[start]])
            batch = order[start:start + max(1, self.batch_tokens // max(1, width))]
            start += len(batch)
            ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, :len(encoded[i])] = 1
            yield batch, ids, mask

    @torch.no_grad()
    def score(self, prompts: list, completions: list[str]) -> list[float]:
        """One float per completion (float32 values of the model's logit). An offloaded model comes onto the GPU
        for it and stays there until release()."""
        full = [self.encode(p, c, cut=False) for p, c in zip(prompts, completions)]
        self.last_truncated = [len(x) > self.max_length for x in full]
        encoded = [x[-self.max_length:] for x in full]
        out = [0.0] * len(encoded)
        if not self.on_device:
            self.model.to(self.device)
            self.on_device = True
        for batch, ids, mask in self.batches(encoded):
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, i in enumerate(batch):
                out[i] = float(logits[row, 0].float())
        return out

    def release(self) -> None:
        """An offloaded model back to host memory (the policy trains on its GPU next)."""
        if self.offload and self.on_device:
            self.model.to("cpu")
            self.on_device = False
            torch.cuda.empty_cache()


class RunningNorm:
    """reward_model_normalize running: scores standardised by the mean and std of every score seen so far (this
    batch's included), as OpenRLHF's running reward normalisation; its state goes into checkpoints."""

    def __init__(self, state: dict | None = None):
        self.count, self.mean, self.m2 = (state or {}).get("count", 0), (state or {}).get("mean", 0.0), \
            (state or {}).get("m2", 0.0)

    def update(self, values: list[float]) -> None:
        for x in values:  # Welford
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    def __call__(self, values: list[float]) -> list[float]:
        self.update(values)
        std = (self.m2 / self.count) ** 0.5 if self.count > 1 else 1.0
        return [(x - self.mean) / max(std, 1e-6) for x in values]

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}
