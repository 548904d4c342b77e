"""A rollout sample, the one rule for which of its tokens count, and the device tensors a policy rank trains on.

Every stage reads the same `Sample`: the rollout rank makes it, the reference ranks fill in `ref_logprobs`, the
policy ranks plan it into micro-batches and turn each micro-batch into tensors once per step (`build`). Per-token
tensors are flat over the completion tokens of the micro-batch ([N]), whatever the layout of the model's input:
- packed (padding-free): the micro-batch's sequences concatenated into one row [1, T], position ids restarting at
  each sequence, and the bounds of each sequence (cu_seqlens) for attention that never crosses a sequence;
- padded: right-padded rows [B, L] with a causal mask over the real tokens.
The model then returns logits only at the N positions that predict a completion token.

Vision-language samples carry their prompt's images as the processor made them (`Images`: pixel patches and each
image's grid), shared by the samples of a group; a micro-batch concatenates them in sample order, which is the order
of the image tokens in its input, and its position ids are the model's multimodal (mRoPE) ones, made per sample by
the model's own rule (`build(..., vision=...)`). Only a prompt's image tokens take image features: the same token
sampled in a completion is text, as it is to vLLM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tgrpo import algorithm


@dataclass
class Images:
    """A prompt's images as the model's processor made them: pixel patches [P, D] (every image's, in order) and
    each image's (t, h, w) patch grid [n, 3]; its image tokens in the prompt are t*h*w / merge**2 per image."""
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    refs: list | None = None  # JSON-able references of the images (remote rewards, samples.jsonl)

    @property
    def count(self) -> int:
        return int(self.grid_thw.shape[0])


@dataclass
class Sample:
    """One completion of one prompt."""
    prompt_ids: list[int]  # the prompt's tokens, chat template applied
    completion_ids: list[int]  # everything after the prompt: the model's tokens and, in multi-turn episodes, tools'
    rollout_logprobs: list[float]  # vLLM's logprob of each completion token as it was sampled (0.0 on tool tokens)
    truncated: bool = False  # stopped by the token budget (max_completion_length), not by the model
    completion_mask: list[int] | None = None  # 1 on the model's tokens, 0 on a tool's output; None: all the model's
    reward: float = 0.0  # the weighted sum of the rewards (and penalties) of this completion
    advantage: float = 0.0  # the reward against its group's, shared by every counted token of the completion
    reward_parts: dict[str, float] = field(default_factory=dict)  # each reward's raw value, for the logs
    ref_logprobs: list[float] | None = None  # the frozen reference's logprob of each completion token (beta > 0)
    answer: str = ""  # the reference answer the rewards compared against
    prompt_text: str = ""
    completion_text: str = ""
    segments: list[tuple[str, int]] | None = None  # multi-turn: (text, 1 model / 0 tool) pieces, for samples.jsonl
    turns: int = 1  # generations in the episode
    tool_calls: int = 0
    # advantage_estimator gae: the critic's value before each completion token, GAE's advantage of each token
    # (whitened over the step) and the return the critic learns
    values: list[float] | None = None
    token_advantages: list[float] | None = None
    returns: list[float] | None = None
    # async_mode: the weights version (updates the engine had loaded) that sampled each completion token, and the
    # group's place in the rollout stream, (engine index, position), which a checkpoint records as trained
    versions: list[int] | None = None
    group: tuple[int, int] | None = None
    fresh_mask: list[int] | None = None  # async_mode: 1 on the model's tokens sampled by the weights being trained
    images: Images | None = None  # vision-language: the prompt's images (one object shared by the group)
    # rewards from models and TRL-style functions: the prompt as the dataset gave it and its row's other columns
    prompt: list[dict] | str | None = None
    columns: dict | None = None

    @property
    def model_mask(self) -> list[int]:
        """1 on every token the model generated: what the vLLM/trainer mismatch is measured on."""
        return self.completion_mask if self.completion_mask is not None else [1] * len(self.completion_ids)

    @property
    def model_tokens(self) -> int:
        return len(self.completion_ids) if self.completion_mask is None else sum(self.completion_mask)

    def loss_mask(self, mask_truncated: bool) -> list[int]:
        """The one rule for which tokens count in the loss, the KL and the normalisers: the model's own tokens,
        none of a completion that was cut off when mask_truncated_completions is set."""
        if mask_truncated and self.truncated:
            return [0] * len(self.completion_ids)
        return self.model_mask

    def counted_tokens(self, mask_truncated: bool) -> int:
        return 0 if mask_truncated and self.truncated else self.model_tokens

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def filler(pad_id: int) -> Sample:
    """A two-token sample whose tokens count nowhere: it fills a micro-batch slot a rank has no samples for, so that
    every rank still runs the forward and backward that ZeRO-3's collectives need."""
    return Sample([pad_id], [pad_id], [0.0], completion_mask=[0])


# --- planning: which samples go into which micro-batch on which rank ---------------------------------------------

@dataclass
class Plan:
    """micro[j][r]: rank r's micro-batches of mini-batch j, each a list of sample indices (empty: a filler).
    Every rank has the same number of micro-batches in a mini-batch (ZeRO-3's gathers are collectives)."""
    micro: list[list[list[list[int]]]]

    def rank(self, r: int) -> list[list[list[int]]]:
        return [mini[r] for mini in self.micro]


def plan(lengths: list[int], ranks: int, mini_batches: int, max_tokens: int, max_seqs: int) -> Plan:
    """Split a batch (sample token counts `lengths`) into mini-batches of consecutive samples, each over `ranks`
    ranks and into micro-batches. max_tokens > 0: each rank gets about the same number of tokens (largest first,
    to the least loaded rank) packed into as few micro-batches as keep each under max_tokens, the same number on
    every rank; a sequence longer than max_tokens gets a micro-batch of its own. max_tokens = 0: max_seqs
    sequences per micro-batch, each rank a contiguous slice. Deterministic: every rank computes the same plan."""
    n = len(lengths)
    size = math.ceil(n / mini_batches)
    out = []
    for j in range(mini_batches):
        indices = list(range(j * size, min(n, (j + 1) * size)))
        if max_tokens <= 0:
            share = math.ceil(len(indices) / ranks)
            slices = [indices[r * share:(r + 1) * share] for r in range(ranks)]
            count = max(1, math.ceil(share / max_seqs))
            out.append([[s[i * max_seqs:(i + 1) * max_seqs] for i in range(count)] for s in slices])
            continue
        per_rank = _balance(indices, lengths, ranks)
        count = max(_bins_needed(part, lengths, max_tokens) for part in per_rank)
        out.append([_balance(part, lengths, count) for part in per_rank])
    return Plan(out)


def _balance(indices: list[int], lengths: list[int], parts: int) -> list[list[int]]:
    """Longest first, each to the part with the fewest tokens so far (ties: the lowest part); each part keeps
    batch order."""
    loads = [0] * parts
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        k = min(range(parts), key=lambda p: (loads[p], p))
        loads[k] += lengths[i]
        out[k].append(i)
    return [sorted(part) for part in out]


def _bins_needed(indices: list[int], lengths: list[int], max_tokens: int) -> int:
    """The fewest balanced micro-batches that keep every one under max_tokens (or a too-long sequence alone)."""
    if not indices:
        return 1
    count = max(1, math.ceil(sum(lengths[i] for i in indices) / max_tokens))
    while count < len(indices):
        if max(sum(lengths[i] for i in part) for part in _balance(indices, lengths, count)) <= max_tokens:
            break
        count += 1
    return count


# --- tensors -------------------------------------------------------------------------------------------------------

@dataclass
class MicroBatch:
    """One forward/backward's samples as tensors on the device. Token tensors are [N], the micro-batch's completion
    tokens in order; the model's input is packed ([1, T]) or padded ([B, L])."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    model_kwargs: dict  # packed: sequence bounds for the attention; padded: the 4D attention mask
    logits_index: torch.Tensor  # [N]: packed, positions in T; padded, positions in the flattened [B * L]
    targets: torch.Tensor  # [N] the completion tokens
    rollout_logp: torch.Tensor  # [N] vLLM's logprobs
    advantages: torch.Tensor  # [N] each token's advantage: its sequence's (GRPO) or its own (GAE)
    loss_mask: torch.Tensor  # [N] 1 where the token counts in the loss (Sample.loss_mask)
    model_mask: torch.Tensor  # [N] 1 on the model's tokens (Sample.model_mask)
    loss_weight: torch.Tensor  # [N] the loss normaliser of each counted token (algorithm.token_loss_weights)
    ref_logp: torch.Tensor | None  # [N] the reference's logprobs, when every sample has them
    lengths: list[int]  # completion tokens per sample, to split [N] results back into samples
    old_logp: torch.Tensor | None = None  # [N] the policy's logprobs before the step's first update, when needed
    packed: bool = True
    old_values: torch.Tensor | None = None  # [N] the critic's values before its update (gae), when every sample has
    returns: torch.Tensor | None = None  # [N] the critic's targets (gae)
    fresh_mask: torch.Tensor | None = None  # [N] async_mode: 1 on tokens of the weights being trained (lag 0)
    # vision-language: the micro-batch's images in the order of their tokens (None: none in it), and the position
    # ids are the model's multimodal ones: packed [4, 1, T] (the text positions first, then mRoPE's three rows),
    # padded [3, B, L]
    # The images go through the tower once per micro-batch: samples that share their Images (a group's n samples)
    # share the pixels here too, and feature_index [image tokens of the micro-batch] picks each image token's row of
    # the tower's output (None: every sample's images are its own, in token order)
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None  # the input's shape: True where an image's features go
    feature_index: torch.Tensor | None = None
    vision: bool = False


def build(samples: list[Sample], device: torch.device, *, packed: bool, pad_id: int, mask_truncated: bool = False,
          loss_weights: list[float] | None = None, vision=None) -> MicroBatch:
    """The tensors of one micro-batch, made on the host in one pass and copied to the device once each.
    loss_weights: per-sample normaliser of each counted token (default 1). vision (vision-language models):
    `vision.image_token_id`, `vision.patches_per_token`, and `vision.positions(prompt_ids, completion_ids,
    grid_thw)` -> [3, length], a sequence's multimodal position ids by the model's rule (grid_thw: its images'
    grids, or None); the micro-batch then carries its samples' images, each distinct Images object once."""
    targets, rollout, adv, loss_mask, model_mask, weights, ref = [], [], [], [], [], [], []
    values, returns, fresh = [], [], []
    have_fresh = any(s.fresh_mask is not None for s in samples)
    have_ref = all(s.ref_logprobs is not None for s in samples)
    have_values = all(s.values is not None and s.returns is not None for s in samples)
    for k, s in enumerate(samples):
        c = len(s.completion_ids)
        targets += s.completion_ids
        rollout += s.rollout_logprobs
        adv += s.token_advantages if s.token_advantages is not None else [s.advantage] * c
        loss_mask += s.loss_mask(mask_truncated)
        model_mask += s.model_mask
        weights += [1.0 if loss_weights is None else loss_weights[k]] * c
        if have_ref:
            ref += s.ref_logprobs
        if have_values:
            values += s.values
            returns += s.returns
        if have_fresh:
            fresh += s.fresh_mask if s.fresh_mask is not None else [0] * c
    if packed:
        ids, positions, index, bounds = [], [], [], [0]
        for s in samples:
            p, c, start = len(s.prompt_ids), len(s.completion_ids), len(ids)
            ids += s.prompt_ids + s.completion_ids
            positions += range(p + c)
            index += range(start + p - 1, start + p + c - 1)  # the logits at t predict token t + 1
            bounds.append(len(ids))
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        input_ids = torch.tensor([ids], dtype=torch.long)
        position_ids = torch.tensor([positions], dtype=torch.long)
        if vision is not None:  # [4, 1, T]: the text positions (where sequences start), then each sample's mRoPE
            rows = torch.cat([vision.positions(s.prompt_ids, s.completion_ids, _grid(s)) for s in samples], dim=1)
            position_ids = torch.cat([position_ids, rows.to(torch.long)], dim=0)[:, None]
            image_mask = torch.tensor([[x for s in samples for x in _image_slots(s, vision.image_token_id)]])
        cu = torch.tensor(bounds, dtype=torch.int32)
        model_kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    else:
        width = max(s.length for s in samples)
        input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
        real = torch.zeros((len(samples), width), dtype=torch.bool)
        index = []
        for b, s in enumerate(samples):
            p, c = len(s.prompt_ids), len(s.completion_ids)
            input_ids[b, :p + c] = torch.tensor(s.prompt_ids + s.completion_ids)
            real[b, :p + c] = True
            index += range(b * width + p - 1, b * width + p + c - 1)
        position_ids = torch.arange(width).expand(len(samples), width).contiguous()
        if vision is not None:  # [3, B, L], padding at 0
            position_ids = torch.zeros((3, len(samples), width), dtype=torch.long)
            image_mask = torch.zeros((len(samples), width), dtype=torch.bool)
            for b, s in enumerate(samples):
                position_ids[:, b, :s.length] = vision.positions(s.prompt_ids, s.completion_ids, _grid(s))
                image_mask[b, :s.length] = torch.tensor(_image_slots(s, vision.image_token_id))
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = causal[None] & real[:, None, :]  # [B, L(query), L(key)]: earlier real tokens only
        model_kwargs = {"attention_mask": mask[:, None]}

    def floats(values):
        return torch.tensor(values, dtype=torch.float32)

    host = {"input_ids": input_ids, "position_ids": position_ids, "logits_index": torch.tensor(index),
            "targets": torch.tensor(targets, dtype=torch.long), "rollout_logp": floats(rollout),
            "advantages": floats(adv), "loss_mask": floats(loss_mask), "model_mask": floats(model_mask),
            "loss_weight": floats(weights), "ref_logp": floats(ref) if have_ref else None,
            "old_values": floats(values) if have_values else None, "returns": floats(returns) if have_values else None,
            "fresh_mask": floats(fresh) if have_fresh else None}
    with_images = [s.images for s in samples if s.images is not None]
    if vision is not None:
        host["image_mask"] = image_mask
    if with_images:
        distinct = list({id(i): i for i in with_images}.values())
        host["pixel_values"] = torch.cat([i.pixel_values for i in distinct])
        host["image_grid_thw"] = torch.cat([i.grid_thw for i in distinct])
        if len(distinct) < len(with_images):
            host["feature_index"] = _feature_index(with_images, distinct, vision.patches_per_token)
    on_device = {k: _to(v, device) for k, v in host.items()}
    model_kwargs = {k: _to(v, device) if isinstance(v, torch.Tensor) else v for k, v in model_kwargs.items()}
    return MicroBatch(**on_device, model_kwargs=model_kwargs, lengths=[len(s.completion_ids) for s in samples],
                      packed=packed, vision=vision is not None)


def _feature_index(with_images: list[Images], distinct: list[Images], patches_per_token: int) -> torch.Tensor:
    """For each image token of the micro-batch, in order, its row in the tower's output over the distinct images."""
    start, offset = {}, 0
    for i in distinct:
        start[id(i)] = offset
        offset += int(i.grid_thw.prod(-1).sum()) // patches_per_token
    return torch.cat([torch.arange(start[id(i)], start[id(i)] + int(i.grid_thw.prod(-1).sum()) // patches_per_token)
                      for i in with_images])


def _grid(s: Sample) -> torch.Tensor | None:
    return s.images.grid_thw if s.images is not None else None


def _image_slots(s: Sample, image_token_id: int) -> list[bool]:
    """Where a sequence's image features go: its prompt's image tokens (none without images)."""
    if s.images is None:
        return [False] * s.length
    return [t == image_token_id for t in s.prompt_ids] + [False] * len(s.completion_ids)


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if tensor is None or device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def split(values: torch.Tensor, lengths: list[int]) -> list[list[float]]:
    """Per-sample lists of a flat [N] tensor: one copy to the host."""
    flat = values.tolist()
    out, start = [], 0
    for n in lengths:
        out.append(flat[start:start + n])
        start += n
    return out


def loss_weights(samples: list[Sample], micro: list[list[list[int]]], loss_type: str, *, mask_truncated: bool,
                 max_completion_length: int) -> list[list[list[float]]]:
    """For one mini-batch (micro[r][m]: rank r's m-th micro-batch, as sample indices), the loss weight of each
    sample's counted tokens, out[r][m][k] for the k-th sample of micro[r][m]: the weighted sum of every rank's
    per-token losses is then the mini-batch's loss (algorithm.token_loss_weights). Every rank computes the same."""
    everything = [i for rank in micro for mb in rank for i in mb]
    total_tokens = sum(samples[i].counted_tokens(mask_truncated) for i in everything)
    # bnpo averages over micro-batches that hold samples: a rank's empty filler (it runs only to keep the
    # collectives in step) is none of TRL's, whose micro-batches are never empty
    num_micro = sum(1 for rank in micro for mb in rank if mb)
    return [[algorithm.token_loss_weights(loss_type, [samples[i].counted_tokens(mask_truncated) for i in mb],
                                          total_tokens=total_tokens, total_seqs=len(everything),
                                          max_completion_length=max_completion_length, num_micro_batches=num_micro)
             for mb in rank] for rank in micro]
