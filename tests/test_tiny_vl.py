"""The embedded vision-language model ('tiny-vl') and its bundled task: the model loads through AutoProcessor and
AutoModelForImageTextToText, a bundled row's prompt holds its image's tokens, the answers read the image, and the
warm-up leaves greedy answers right more often than any image-blind guess; the random Qwen2.5-VL shapes build."""
import collections
import json
import os
import random
import re

import pytest
import torch
from PIL import Image

from tgrpo.rollout.rewards import math_reward
from tgrpo.tiny import (DEFAULT_SYSTEM, RANDOM_VL_SHAPES, draw_shapes, ensure_model, ensure_random_model,
                        shape_question)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(ROOT, "data", "shapes")


def read_rows(part: str) -> list[dict]:
    with open(os.path.join(SHAPES, f"{part}.json")) as f:
        return json.load(f)


def as_prompt(row: dict) -> tuple[Image.Image, list[dict]]:
    """A bundled row as the data loader gives it to the processor: the <image> placeholder as an image item."""
    text = row["messages"][0]["content"]
    assert text.startswith("<image>")
    return (Image.open(os.path.join(SHAPES, row["images"][0])).convert("RGB"),
            [{"role": "system", "content": DEFAULT_SYSTEM},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text[len("<image>"):]}]}])


@pytest.fixture(scope="module")
def vl():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = ensure_model(os.path.join(ROOT, ".cache"), "tiny-vl")
    return (AutoProcessor.from_pretrained(folder),
            AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval())


def test_bundled_rows_are_the_generator_s():
    """data/shapes/ is what data/make_shapes.py writes (seed 7, train first), in the TRL/verl row form."""
    rows = read_rows("train") + read_rows("test")
    assert len(rows) == len({r["images"][0] for r in rows}) == 384
    rng = random.Random(7)
    for row in rows[:20]:
        image, colours = draw_shapes(rng)
        question, answer = shape_question(rng, colours)
        assert row["messages"] == [{"role": "user", "content": f"<image>{question}"}] and row["answer"] == answer
        assert Image.open(os.path.join(SHAPES, row["images"][0])).convert("RGB").tobytes() == image.tobytes()
    assert all(math_reward(f"<answer>{r['answer']}</answer>", r["answer"]) == 1.0 for r in rows[:20])
    size = sum(os.path.getsize(os.path.join(SHAPES, r["images"][0])) for r in rows)
    assert size < 300_000, f"the bundled images take {size} bytes"


def test_loads_with_processor_and_generation_config(vl):
    processor, model = vl
    tokenizer = processor.tokenizer
    assert type(processor).__name__ == "Qwen2VLProcessor" and type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert processor.video_processor is not None
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.text_config.vocab_size == len(tokenizer)
    # the template takes string content as well as content lists
    text = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("size", [(56, 56), (84, 112), (112, 112)])
def test_prompt_holds_one_token_per_28_pixel_cell(vl, size):
    processor, model = vl
    row = next(r for r in read_rows("train") if Image.open(os.path.join(SHAPES, r["images"][0])).size == size)
    image, messages = as_prompt(row)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.count("<|image_pad|>") == 1
    encoded = processor(text=[text], images=[image], return_tensors="pt")
    pads = int((encoded["input_ids"] == model.config.image_token_id).sum())
    assert pads == size[0] * size[1] // (28 * 28) == int(encoded["image_grid_thw"].prod()) // 4


def answer_logprobs(processor, model, image, question: str) -> torch.Tensor:
    """Log-probabilities of the replies "1" ... "4" to question about image."""
    messages = [{"role": "system", "content": DEFAULT_SYSTEM},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = processor(text=[text], images=[image], return_tensors="pt")
    digits = [processor.tokenizer.convert_tokens_to_ids(str(n)) for n in range(1, 5)]
    with torch.no_grad():
        logits = model(**encoded).logits[0, -1]
    return torch.log_softmax(logits, -1)[digits]


def test_answer_depends_on_the_image(vl):
    """The same question about an image of one shape and one of four: the model's answers differ, and lean the
    right way."""
    processor, model = vl
    rng = random.Random(3)
    by_count = collections.defaultdict(list)
    while min(len(by_count[1]), len(by_count[4])) < 8:
        image, colours = draw_shapes(rng)
        by_count[len(colours)].append(image)
    question = "How many shapes are there?"
    one = torch.stack([answer_logprobs(processor, model, i, question) for i in by_count[1][:8]]).mean(0)
    four = torch.stack([answer_logprobs(processor, model, i, question) for i in by_count[4][:8]]).mean(0)
    assert (one - four).abs().max() > 0.5, (one, four)
    assert one[0] - one[3] > four[0] - four[3], (one, four)  # "1" over "4" more for the image of one


def test_warm_up_beats_an_image_blind_guess(vl):
    """Greedy answers to the bundled test rows (the last number of the reply, tagged or not) are right more often
    than the best answer that ignores the image (the commonest answer of each question)."""
    processor, model = vl
    rows = read_rows("test")
    prompts = [as_prompt(r) for r in rows]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for _, m in prompts]
    encoded = processor(text=texts, images=[i for i, _ in prompts], padding=True, padding_side="left",
                        return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=16, do_sample=False)
    replies = processor.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    right = sum((re.findall(r"\d+", reply) or [None])[-1] == r["answer"] for reply, r in zip(replies, rows))
    answers = collections.defaultdict(collections.Counter)
    for r in rows:
        answers[r["messages"][0]["content"]][r["answer"]] += 1
    blind = sum(c.most_common(1)[0][1] for c in answers.values())
    assert right >= blind + 6, f"{right} of {len(rows)} right, an image-blind guess gets {blind}: {replies[:8]}"


def test_random_vl_model_builds_and_runs(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = ensure_random_model(str(tmp_path), "vl-tiny-random")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration" and model.dtype == torch.bfloat16
    tokenizer = processor.tokenizer
    assert len(tokenizer) == model.config.text_config.vocab_size == RANDOM_VL_SHAPES["vl-tiny-random"][0]["vocab_size"]
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    image, messages = as_prompt(read_rows("train")[0])
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = processor(text=[text], images=[image], return_tensors="pt")
    out = model.generate(**encoded, max_new_tokens=8, do_sample=True, min_new_tokens=8)
    assert len(tokenizer.decode(out[0, encoded["input_ids"].shape[1]:])) > 8  # filler words, not empty tokens


def test_vl_3b_shape_is_qwen2_5_vl_3b():
    """The benchmark shape has Qwen2.5-VL-3B-Instruct's parameter count (built on the meta device: no memory)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text, vision, pixels = RANDOM_VL_SHAPES["vl-3b"]
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters())
    assert 3.70e9 < params < 3.80e9, params
    assert sum(p.numel() for p in model.model.visual.parameters()) == pytest.approx(6.7e8, rel=0.02)
    assert pixels == (56 * 56, 448 * 448)


@pytest.mark.slow
def test_vllm_generates_from_a_bundled_row():
    """vLLM's CPU engine loads tiny-vl and samples from a bundled row with its image."""
    import subprocess
    import sys

    script = """
import json, os, sys
from PIL import Image
from vllm import LLM, SamplingParams
folder, shapes = sys.argv[1], sys.argv[2]
row = json.load(open(os.path.join(shapes, "train.json")))[0]
llm = LLM(folder, dtype="float32", enforce_eager=True, max_model_len=512, limit_mm_per_prompt={"image": 1}, seed=0)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["messages"][0]["content"][7:]}]}]
prompt = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
image = Image.open(os.path.join(shapes, row["images"][0])).convert("RGB")
out = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": image}}], SamplingParams(max_tokens=8, n=4))
print("RESULT", json.dumps([len(out[0].prompt_token_ids), [c.text for c in out[0].outputs]]))
"""
    folder = ensure_model(os.path.join(ROOT, ".cache"), "tiny-vl")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, "-c", script, folder, SHAPES], capture_output=True, text=True, env=env,
                          timeout=600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, proc.stderr[-3000:]
    prompt_len, texts = json.loads(line[len("RESULT "):])
    pads = Image.open(os.path.join(SHAPES, read_rows("train")[0]["images"][0])).size
    assert prompt_len > pads[0] * pads[1] // 784 and len(texts) == 4
