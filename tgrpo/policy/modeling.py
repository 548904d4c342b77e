"""The policy's forward on a micro-batch (batch.MicroBatch): per-token logprobs of the completion tokens.

Models are loaded with the attention implementation registered here (ATTENTION). On a packed micro-batch it runs
each sequence's causal attention on its own span of the concatenated row: on GPU with flash attention's varlen
kernel (torch.nn.attention.varlen, FlashAttention-2 in torch itself), elsewhere by gathering the sequences into
padded rows for one scaled-dot-product call. On a padded micro-batch it is transformers' SDPA with the batch's mask. The model computes logits only at
the positions that predict a completion token, and the log-softmax runs a chunk of rows at a time in float32
(algorithm.token_logprobs): no full-vocabulary float32 logits of the micro-batch are made.

Vision-language models (Qwen2-VL, Qwen2.5-VL: a `vision_config` in the model's config) are loaded as image-text
models, the language model with ATTENTION and the vision tower with SDPA (its attention is over each image, not
causal). Their input embeddings are made here: the tower's features of the micro-batch's images put in place of its
image tokens, then the language model runs on the embeddings with the multimodal position ids batch.build made.
Every forward runs the tower, on a blank image when the micro-batch has none, its output added times zero: ZeRO-3
gathers the tower's weights with collectives, so every rank must run it whatever its samples hold.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from tgrpo import algorithm
from tgrpo.batch import MicroBatch

ATTENTION = "tgrpo_packed"

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _params = inspect.signature(_varlen_attn).parameters
    _CAUSAL = {"is_causal": True} if "is_causal" in _params else {"window_size": (-1, 0)}
    _TAKES_SCALE = "scale" in _params
except ImportError:  # torch without it: the per-sequence path
    _varlen_attn = None
_kv_heads_ok = [True]  # grouped-query key/value heads as they are; False once the kernel refused them


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None)."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:  # a padded batch, with its mask
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") or dropout:
        raise ValueError("packed micro-batches support plain causal attention only (this model has sliding-window "
                         "layers or attention dropout): set padding_free false")
    default_scale = scaling is None or abs(scaling - query.shape[-1] ** -0.5) < 1e-12
    if (query.is_cuda and _varlen_attn is not None and query.dtype in (torch.bfloat16, torch.float16)
            and (_TAKES_SCALE or default_scale)):
        return _varlen(query, key, value, bounds, kwargs["max_length_q"], scaling), None
    return _padded_attention(query, key, value, bounds, scaling), None


def _padded_attention(query, key, value, bounds: torch.Tensor, scaling):
    """Causal attention of packed sequences without a varlen kernel (CPU; float32 on GPU): the sequences gathered
    into padded rows, one SDPA call over them, then back into the packed order."""
    rows, keep = _pad_index(bounds, query.device)
    width = rows.shape[1]
    q, k, v = (x[0][:, rows.view(-1)].unflatten(1, rows.shape).transpose(0, 1) for x in (query, key, value))
    mask = torch.ones(width, width, dtype=torch.bool, device=query.device).tril()[None] & keep[:, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3])[keep.view(-1)].unsqueeze(0)


def _pad_index(bounds: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] packed positions of each sequence's tokens (padding repeats the sequence's first token) and the mask
    of real ones."""
    edges = bounds.tolist()
    starts = torch.tensor(edges[:-1], device=device)
    lengths = torch.tensor([b - a for a, b in zip(edges, edges[1:])], device=device)
    width = int(lengths.max())
    offsets = torch.arange(width, device=device)
    keep = offsets[None] < lengths[:, None]
    return starts[:, None] + torch.where(keep, offsets[None], 0), keep


def _varlen(query, key, value, bounds, longest: int, scaling):
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # [T, heads, D]
    extra = dict(_CAUSAL, **({"scale": scaling} if _TAKES_SCALE else {}))
    if _kv_heads_ok[0] or k.shape[1] == q.shape[1]:
        try:
            return _varlen_attn(q, k, v, bounds, bounds, longest, longest, **extra).unsqueeze(0)
        except RuntimeError:
            if k.shape[1] == q.shape[1]:
                raise
            _kv_heads_ok[0] = False
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    return _varlen_attn(q, k, v, bounds, bounds, longest, longest, **extra).unsqueeze(0)


def register() -> str:
    """Make ATTENTION known to transformers (before a model is loaded with it); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _packed_attention)
    return ATTENTION


def is_vision(config) -> bool:
    """A vision-language model (an image-text model with a vision tower), by its transformers config."""
    return getattr(config, "vision_config", None) is not None


def load_kwargs(config, attention: str) -> tuple[type, dict]:
    """The transformers auto class and from_pretrained arguments of a policy-side model: a causal LM, or a
    vision-language model with its tower on SDPA."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if is_vision(config):
        return AutoModelForImageTextToText, {"attn_implementation": {"": attention, "text_config": attention,
                                                                     "vision_config": "sdpa"}}
    return AutoModelForCausalLM, {"attn_implementation": attention}


def value_head(model) -> None:
    """A vision-language critic: the LM head replaced by a scalar head, drawn as transformers draws a token
    classifier's (normal, the config's initializer_range; zero bias), the same on every rank."""
    text = model.config.get_text_config()
    weight = model.lm_head.weight
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = torch.nn.Linear(text.hidden_size, 1, dtype=weight.dtype)
        torch.nn.init.normal_(head.weight, std=getattr(text, "initializer_range", 0.02))
        torch.nn.init.zeros_(head.bias)
    model.lm_head = head
    model.config.tie_word_embeddings = False


def hf_model(model) -> torch.nn.Module:
    """The transformers model inside a DeepSpeed engine and a peft wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vision_tower(model) -> torch.nn.Module | None:
    """A vision-language model's vision tower (encoder and merger), None for a text model."""
    inner = getattr(hf_model(model), "model", None)
    return getattr(inner, "visual", None)


class VisionInputs:
    """What batch.build needs of a vision-language model: its image token, and a sequence's multimodal (mRoPE)
    position ids by the model's own rule (get_rope_index), the prompt's image tokens counted as images and the
    completion's tokens as text (a sampled image token included, as vLLM reads it)."""

    def __init__(self, model):
        hf = hf_model(model)
        self.image_token_id = hf.config.image_token_id
        self.patches_per_token = hf.config.vision_config.spatial_merge_size ** 2
        self._rope_index = hf.model.get_rope_index

    def positions(self, prompt_ids: list[int], completion_ids: list[int],
                  grid_thw: torch.Tensor | None) -> torch.Tensor:
        length = len(prompt_ids) + len(completion_ids)
        if grid_thw is None:
            return torch.arange(length).expand(3, -1)
        row = torch.tensor([prompt_ids + completion_ids])
        types = torch.tensor([[int(t == self.image_token_id) for t in prompt_ids] + [0] * len(completion_ids)])
        tokens, expected = int(types.sum()), int(grid_thw.prod(-1).sum()) // self.patches_per_token
        if tokens != expected:
            raise ValueError(f"a prompt has {tokens} image tokens but its {grid_thw.shape[0]} image(s) make "
                             f"{expected}: the prompt's image tokens and its images drifted apart")
        positions, _ = self._rope_index(row, types, image_grid_thw=grid_thw)
        return positions[:, 0]


def vision_inputs(model) -> VisionInputs | None:
    """batch.build's `vision` for this model; None for a text model."""
    return VisionInputs(model) if is_vision(hf_model(model).config) else None


def _blank_image(config, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest image the tower takes: one merged token's patches, all zero."""
    vc = config.vision_config
    merge = vc.spatial_merge_size
    patches = merge * merge
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    return (torch.zeros(patches, dim, device=device, dtype=dtype),
            torch.tensor([[1, merge, merge]], device=device, dtype=torch.long))


def _vision_embeds(model, mb: MicroBatch) -> torch.Tensor:
    """The micro-batch's input embeddings with its images' features in place of their tokens (see the module)."""
    hf = hf_model(model)
    embeds = hf.get_input_embeddings()(mb.input_ids)
    pixels, grid = mb.pixel_values, mb.image_grid_thw
    if pixels is None:
        pixels, grid = _blank_image(hf.config, embeds.device, embeds.dtype)
    features = hf.model.get_image_features(pixels.to(embeds.dtype), grid, return_dict=True).pooler_output
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    if mb.pixel_values is None:
        return embeds + 0.0 * features.sum().to(embeds.dtype)
    if mb.feature_index is not None:  # images shared by several samples ran once: each token takes its row
        if int(mb.feature_index.max()) >= features.shape[0]:
            raise ValueError(f"a micro-batch's image tokens need {int(mb.feature_index.max()) + 1} features but its "
                             f"images make {features.shape[0]}: the prompts' image tokens and their images drifted "
                             "apart")
        features = features.index_select(0, mb.feature_index)
    slots = mb.image_mask
    if int(slots.sum()) != features.shape[0]:
        raise ValueError(f"a micro-batch has {int(slots.sum())} image tokens but its images make {features.shape[0]} "
                         "features: the prompts' image tokens and their images drifted apart")
    return embeds.masked_scatter(slots.unsqueeze(-1).expand_as(embeds), features.to(embeds.dtype))


def _inputs(model, mb: MicroBatch) -> dict:
    if mb.vision:
        return {"inputs_embeds": _vision_embeds(model, mb)}
    return {"input_ids": mb.input_ids}


def logits_at_targets(model, mb: MicroBatch) -> torch.Tensor:
    """The model's logits at the positions predicting each completion token, [N, V] (the model's dtype)."""
    if mb.packed:
        out = model(**_inputs(model, mb), position_ids=mb.position_ids, logits_to_keep=mb.logits_index,
                    use_cache=False, **mb.model_kwargs)
        return out.logits[0]
    out = model(**_inputs(model, mb), position_ids=mb.position_ids, use_cache=False, **mb.model_kwargs)
    return out.logits.reshape(-1, out.logits.shape[-1]).index_select(0, mb.logits_index)


def head_at_targets(model, mb: MicroBatch) -> torch.Tensor:
    """A model's per-position outputs (a value head's [.., 1]) at the positions predicting each completion token,
    [N, C]: the whole row is computed (a narrow head costs nothing), then indexed."""
    out = model(**_inputs(model, mb), position_ids=mb.position_ids, use_cache=False, **mb.model_kwargs)
    return out.logits.reshape(-1, out.logits.shape[-1]).index_select(0, mb.logits_index)


def token_logprobs(model, mb: MicroBatch, temperature: float,
                   entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of each completion token under the model at the sampling temperature ([N] float32, with gradient
    when enabled) and, if asked, the entropy of each position's distribution (no gradient)."""
    return algorithm.token_logprobs(logits_at_targets(model, mb), mb.targets, temperature, entropy)
