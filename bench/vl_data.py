"""The vision-language benchmark's prompts and FLOPs (bench/step.py with a vision-language model).

`ensure_vl_data` draws one distinct image per prompt (coloured shapes on a coloured ground, `size` x `size` pixels,
PNG) into a folder of cache_dir, with a data file in the conventions tgrpo/data.py reads:
`{"messages": [{"role": "user", "content": "<image>How many shapes are there?"}], "images": ["images/000000.png"],
"answer": "3"}`. The images are drawn from (seed, index) alone, so every rank and every run makes the same folder
(built once, under a lock). No image repeats within a run when the file holds as many prompts as the run draws:
vLLM's prefix and processor caches would otherwise serve a repeated image without its encoder and prefill work.

`vision_params` counts a model's vision tower (encoder blocks and merger) for the MFU of bench/step.py: the tower
runs on every image patch (Qwen2-VL and Qwen2.5-VL: 14 x 14 pixels x 2 frames), its merger on every
spatial_merge_size**2 patches (one image token).
"""
from __future__ import annotations

import fcntl
import json
import os
import random

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
       "purple": (140, 60, 180), "orange": (250, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15)}


def ensure_vl_data(cache_dir: str, count: int, size: int, seed: int) -> str:
    """The data file of `count` prompts with one distinct `size` x `size` image each (built once); returns its
    path."""
    out = os.path.join(os.path.abspath(cache_dir), f"bench-vl-data-{size}px-{count}-s{seed}")
    path = os.path.join(out, "train.json")
    if os.path.isfile(os.path.join(out, "done")):
        return path
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(out, "done")):
            os.makedirs(os.path.join(out, "images"), exist_ok=True)
            rows = []
            for i in range(count):
                image, n, colour = draw(random.Random(f"{seed}-{i}"), size)
                name = f"images/{i:06d}.png"
                image.save(os.path.join(out, name))
                question = (f"How many {colour} shapes are there?" if colour else "How many shapes are there?")
                rows.append({"messages": [{"role": "user", "content": "<image>" + question}], "images": [name],
                             "answer": str(n)})
            with open(path, "w") as f:
                f.write("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
            open(os.path.join(out, "done"), "w").close()
    return path


def draw(rng: random.Random, size: int):
    """An image of 2-9 shapes (rectangles, ellipses, triangles) on a ground of two colours; (image, the count
    asked for, the colour asked about or '')."""
    from PIL import Image, ImageDraw

    ground = tuple(rng.randrange(60, 200) for _ in range(3))
    image = Image.new("RGB", (size, size), ground)
    pen = ImageDraw.Draw(image)
    band = tuple(rng.randrange(60, 200) for _ in range(3))  # a second ground colour over a random band
    top = rng.randrange(size)
    pen.rectangle([0, top, size, min(size, top + rng.randrange(size // 8, size // 2))], fill=band)
    colours = []
    for _ in range(rng.randint(2, 9)):
        colour = rng.choice(COLOURS)
        colours.append(colour)
        w, h = rng.randrange(size // 12, size // 4), rng.randrange(size // 12, size // 4)
        x, y = rng.randrange(0, size - w), rng.randrange(0, size - h)
        kind = rng.randrange(3)
        if kind == 0:
            pen.rectangle([x, y, x + w, y + h], fill=RGB[colour])
        elif kind == 1:
            pen.ellipse([x, y, x + w, y + h], fill=RGB[colour])
        else:
            pen.polygon([(x, y + h), (x + w // 2, y), (x + w, y + h)], fill=RGB[colour])
    if rng.random() < 0.5:
        asked = rng.choice(colours)
        return image, colours.count(asked), asked
    return image, len(colours), ""


def vision_params(model) -> dict | None:
    """The vision tower's parameters of a (DeepSpeed, peft) vision-language model: {"n_vision": every weight of the
    tower, "n_merger": the merger's, "merge": patches per image token, "trainable": whether any tower weight trains};
    None for a text model. Sizes are the full tensors' under ZeRO-3 (ds_numel)."""
    from tgrpo.policy import modeling

    tower = modeling.vision_tower(model)
    if tower is None:
        return None

    def numel(module) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())

    merger = getattr(tower, "merger", None)
    config = getattr(tower, "config", None)
    merge = int(getattr(config, "spatial_merge_size", 2) or 2) ** 2
    return {"n_vision": numel(tower), "n_merger": numel(merger) if merger is not None else 0, "merge": merge,
            "trainable": any(p.requires_grad for p in tower.parameters())}


def count_images(train_step, log: list, label: dict, image_token_id: int):
    """train_step, recording per call (the label's mode, the step's whole batch as every policy rank gets it):
    samples, tokens, images (one per sample that carries it), distinct images (a group's samples share theirs, and
    the policy runs the tower once per distinct image of a micro-batch), image tokens, and the distinct images'
    patches: the tower's work the MFU counts (a group split over two micro-batches runs its image twice, uncounted)."""
    def wrapped(samples):
        with_images = [s for s in samples if s.images is not None]
        distinct = {id(s.images): s.images for s in with_images}.values()
        log.append({"mode": label["mode"], "samples": len(samples),
                    "tokens": sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples),
                    "images": sum(s.images.count for s in with_images),
                    "distinct_images": sum(i.count for i in distinct),
                    "image_tokens": sum(s.prompt_ids.count(image_token_id) for s in with_images),
                    "patches": sum(int(i.pixel_values.shape[0]) for i in distinct)})
        return train_step(samples)
    return wrapped
