"""Vision-language micro-batches on the policy side: packed and padded layouts give the same per-token logprobs and
gradients as each other and as transformers' own forward of each sample alone (its processor's input_ids,
pixel_values, image_grid_thw and mm_token_type_ids), for samples of 0, 1 and 2 images of mixed sizes, a group's
samples sharing one image object, and an image token sampled inside a completion (text, as vLLM reads it). Float32,
CPU; Qwen2-VL and Qwen2.5-VL (windowed vision attention)."""
from __future__ import annotations

import os
import random
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tgrpo import batch  # noqa: E402
from tgrpo.batch import Images, Sample  # noqa: E402
from tgrpo.policy import modeling  # noqa: E402
from vl_fixtures import build  # noqa: E402

CACHE = os.path.join(ROOT, ".cache")
# (image sizes, completion length, samples sharing the prompt's images)
PROMPTS = [([], 5, 1), ([(56, 56)], 7, 3), ([(84, 112), (112, 56)], 4, 1), ([(112, 112)], 6, 2)]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def model_dir(request, tmp_path_factory):
    from tgrpo import tiny

    out = str(tmp_path_factory.mktemp(request.param) / "model")
    build(tiny.ensure_tiny_model(CACHE), out, request.param)
    return out


@pytest.fixture(scope="module")
def loaded(model_dir):
    from transformers import AutoConfig, AutoProcessor

    auto, kwargs = modeling.load_kwargs(AutoConfig.from_pretrained(model_dir), modeling.register())
    model = auto.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    with torch.no_grad():  # a random model's default init gives near-uniform logits: make the tokens matter
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
    return model, AutoProcessor.from_pretrained(model_dir)


def _picture(width: int, height: int, seed: int):
    from PIL import Image

    rng = random.Random(seed)
    return Image.frombytes("RGB", (width, height), bytes(rng.randrange(256) for _ in range(width * height * 3)))


def _samples(model, processor):
    """The PROMPTS' samples, and each one's logprobs by transformers' own forward of that sample alone (NaN for the
    sample with an image token in its completion, which transformers' forward takes for an image slot)."""
    rng = random.Random(1)
    image_token = model.config.image_token_id
    samples, native = [], []
    for k, (sizes, length, group) in enumerate(PROMPTS):
        pictures = [_picture(w, h, 10 * k + i) for i, (w, h) in enumerate(sizes)]
        content = [{"type": "image"} for _ in pictures] + [{"type": "text", "text": f"question {k}"}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        enc = processor(text=[text], images=pictures or None, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        images = Images(enc["pixel_values"], enc["image_grid_thw"]) if pictures else None
        for j in range(group):
            completion = [rng.randrange(400) for _ in range(length)]
            if k == 1 and j == 1:
                completion[2] = image_token  # sampled by the model: text, not an image slot
            samples.append(Sample(ids, completion, [0.0] * length, images=images))
            if image_token in completion:
                native += [float("nan")] * length
                continue
            full = torch.tensor([ids + completion])
            extra = {key: v for key, v in enc.items() if key not in ("input_ids", "attention_mask")}
            extra["mm_token_type_ids"] = torch.cat(
                [enc["mm_token_type_ids"], torch.zeros(1, length, dtype=enc["mm_token_type_ids"].dtype)], 1)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=full, **extra).logits[0].float(), -1)
            native += [logp[len(ids) - 1 + i, t].item() for i, t in enumerate(completion)]
    return samples, torch.tensor(native)


def _logprobs_and_grads(model, samples, packed: bool):
    model.zero_grad()
    mb = batch.build(samples, torch.device("cpu"), packed=packed, pad_id=0, vision=modeling.vision_inputs(model))
    logp, _ = modeling.token_logprobs(model, mb, 1.0)
    (logp * torch.linspace(0.5, 1.5, logp.numel())).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_padded_and_transformers_agree(loaded):
    model, processor = loaded
    samples, native = _samples(model, processor)
    assert samples[1].images is samples[3].images  # a group's samples share one image object
    packed, packed_grads = _logprobs_and_grads(model, samples, packed=True)
    padded, padded_grads = _logprobs_and_grads(model, samples, packed=False)
    known = ~native.isnan()
    assert (packed - native)[known].abs().max() < 1e-5, "the packed forward differs from transformers' own"
    assert (padded - packed).abs().max() < 1e-5, "the padded forward differs from the packed one"
    assert packed_grads.keys() == padded_grads.keys()
    assert any("visual" in n for n in packed_grads)  # the tower trains
    for name, grad in packed_grads.items():
        assert torch.allclose(grad, padded_grads[name], atol=1e-5, rtol=1e-4), name
    # a group's shared images go through the tower once, with the same logprobs and gradients as a copy per sample
    vision = modeling.vision_inputs(model)
    mb = batch.build(samples, torch.device("cpu"), packed=True, pad_id=0, vision=vision)
    distinct = {id(s.images): s.images for s in samples if s.images is not None}.values()
    assert mb.pixel_values.shape[0] == sum(i.pixel_values.shape[0] for i in distinct) and mb.feature_index is not None
    copies = [Sample(s.prompt_ids, s.completion_ids, s.rollout_logprobs, images=None if s.images is None else
                     Images(s.images.pixel_values.clone(), s.images.grid_thw.clone())) for s in samples]
    assert batch.build(copies, torch.device("cpu"), packed=True, pad_id=0, vision=vision).feature_index is None
    own, own_grads = _logprobs_and_grads(model, copies, packed=True)
    assert (own - packed).abs().max() < 1e-5
    for name, grad in packed_grads.items():
        assert torch.allclose(grad, own_grads[name], atol=1e-5, rtol=1e-4), name
    # without the images the same tokens score otherwise: the features really are where the image tokens are
    blind = [Sample(s.prompt_ids, s.completion_ids, s.rollout_logprobs) for s in samples]
    mb = batch.build(blind, torch.device("cpu"), packed=True, pad_id=0, vision=modeling.vision_inputs(model))
    with torch.no_grad():
        without, _ = modeling.token_logprobs(model, mb, 1.0)
    assert (without - native)[known].abs().max() > 0.1


def test_a_micro_batch_without_images_still_runs_the_tower(loaded):
    """ZeRO-3 gathers the tower's weights with collectives: every rank's forward must run it, images or not."""
    model, processor = loaded
    samples = [Sample([1, 2, 3], [4, 5], [0.0, 0.0])]
    _, grads = _logprobs_and_grads(model, samples, packed=True)
    tower = [g for n, g in grads.items() if "visual" in n]
    assert tower and all(float(g.abs().sum()) == 0.0 for g in tower)


def test_images_and_their_tokens_never_drift_apart(loaded):
    model, processor = loaded
    samples, _ = _samples(model, processor)
    one = next(s for s in samples if s.images is not None and s.images.count == 2)
    first = int(one.images.grid_thw[0].prod())
    short = Images(one.images.pixel_values[:first], one.images.grid_thw[:1])  # one image for two images' tokens
    for packed in (True, False):  # named when the batch is built, before any forward
        with pytest.raises(ValueError, match="image tokens but its 1 image.* drifted apart"):
            batch.build([Sample(one.prompt_ids, one.completion_ids, one.rollout_logprobs, images=short)],
                        torch.device("cpu"), packed=packed, pad_id=0, vision=modeling.vision_inputs(model))
    # and by the forward, should a micro-batch's images and tokens part after it was built
    good = batch.build([one], torch.device("cpu"), packed=True, pad_id=0, vision=modeling.vision_inputs(model))
    good.pixel_values, good.image_grid_thw = short.pixel_values, short.grid_thw
    with pytest.raises(ValueError, match="drifted apart"):
        modeling.token_logprobs(model, good, 1.0)


def test_a_frozen_tower_is_left_out_of_the_sync_but_not_of_the_checkpoint(loaded):
    from tgrpo.sync import weights

    model, _ = loaded
    tower = modeling.vision_tower(model)
    tower.requires_grad_(False)
    try:
        synced = [n for n, _ in weights.synced(model)]
        exported = [n for n, _ in weights.synced(model, everything=True)]
        assert synced and not any(".visual." in f".{n}" for n in synced)
        assert any(".visual." in f".{n}" for n in exported)
        assert len(exported) == len(list(model.parameters()))
    finally:
        tower.requires_grad_(True)
