"""The embedded default model: a tiny Qwen2 and a BPE tokenizer trained here, built once into the cache folder.

No hub is reached: the tokenizer is trained with `tokenizers` on the bundled data, the model is initialised from a
`Qwen2Config` (head_dim 64, which vLLM's CPU attention accepts) and given a short supervised warm-up on the bundled
problems, so that GRPO starts from a model that sometimes answers right, as it would from an SFT checkpoint. Most
warm-up answers are plain text, as in SFT data written for another purpose: the model knows some arithmetic but
seldom writes it in the <answer> format the math reward reads, which GRPO then teaches it within the default run.

    python -m tgrpo.tiny [cache_dir]                # build (or find) it and print its folder
    python -m tgrpo.tiny [cache_dir] --random 0.5b  # a randomly initialised model of that shape (benchmarks)
    python -m tgrpo.tiny [cache_dir] --vl           # the tiny vision-language model ('tiny-vl')
    python -m tgrpo.tiny [cache_dir] --rm           # the tiny reward model ('tiny-rm') and judge ('tiny-judge')

Random models (`RANDOM_SHAPES`) are for speed and memory measurements only: Qwen2 shapes with random weights, saved in
bfloat16, and the tiny tokenizer given a filler token for every id of the model's vocabulary, so that whatever a
random model samples decodes to text that differs from completion to completion.
"""
from __future__ import annotations

import fcntl
import json
import os
import random

from tgrpo.search_protocol import SEARCH_CLOSE, SEARCH_OPEN, SEARCH_SYSTEM, format_information

TINY_NAME = "tiny-qwen2-v4"  # a new name for every change of the recipe: caches of the old one are not reused
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_SYSTEM = "Solve the problem. Put only the final answer inside <answer></answer>."
# With every warm-up answer tagged, GRPO had only the arithmetic left to improve, and the default 30 steps moved the
# reward (0.31 -> 0.36) less than its step-to-step noise (issue 24). Tagging few leaves it a skill it learns within
# those steps, the format, and the right answers the model already knows then count.
TAGGED_FRACTION = 0.2
PLAIN_ANSWERS = ("{answer}", "The answer is {answer}.")
WARMUP_STEPS = 300
# Half the search model's rate: at 3e-3 this warm-up got about 1 sampled answer in 5 right even after 600 steps, at
# 1.5e-3 about 1 in 2 after 300 (9 in 10 after 600: then GRPO would have only the format left to teach).
WARMUP_LR = 1.5e-3
# Always the bundled prompts, whatever train_data a run names: the tiny model is the same on every machine.
BUNDLED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "arith_train.json")


SEARCH_NAME = "tiny-qwen2-search-v1"
SEARCH_WARMUP_STEPS = 450
SEARCH_VOCAB = 320  # small: names split into syllables, so a made-up name is copied token by token
SEARCH_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1)
DATA_DIR = os.path.dirname(BUNDLED_DATA)
EMBEDDED = ("tiny", "tiny-search", "tiny-vl", "tiny-rm", "tiny-judge")  # the `model` names built here


def tiny_model_dir(cache_dir: str) -> str:
    return os.path.join(os.path.abspath(cache_dir), TINY_NAME)


def ensure_tiny_model(cache_dir: str) -> str:
    """Build the tiny model unless a complete one is there; safe when several ranks call it at once."""
    return _ensure(tiny_model_dir(cache_dir), lambda out: _build(out, BUNDLED_DATA))


def ensure_search_model(cache_dir: str) -> str:
    """The tiny model of the multi-turn search example: warmed up on search traces over the bundled corpus."""
    return _ensure(os.path.join(os.path.abspath(cache_dir), SEARCH_NAME), _build_search)


def ensure_model(cache_dir: str, name: str) -> str:
    """The folder of the embedded model `name` (one of EMBEDDED), built into cache_dir on first use."""
    if name == "tiny-vl":
        return ensure_vl_model(cache_dir)
    if name in ("tiny-rm", "tiny-judge"):
        return ensure_reward_model(cache_dir) if name == "tiny-rm" else ensure_judge_model(cache_dir)
    return ensure_search_model(cache_dir) if name == "tiny-search" else ensure_tiny_model(cache_dir)


def _ensure(out: str, build) -> str:
    if os.path.isfile(os.path.join(out, "done")):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(out, "done")):
            build(out)
    return out


# Qwen2 shapes for benchmarks: "0.5b" is Qwen2.5-0.5B's (494M parameters with its 151,936-entry vocabulary).
RANDOM_SHAPES = {
    "60m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    # Qwen2.5-14B and -32B (bf16: 29.5 GB and 65.5 GB on disk; the build holds the fp32 model on the GPU first)
    "14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}


# Qwen2.5-VL shapes for benchmarks, (text config, vision config, (min_pixels, max_pixels)): "vl-3b" is
# Qwen2.5-VL-3B-Instruct's architecture (3.75B parameters, 7.5 GB in bfloat16); "vl-tiny-random" (a few MB) runs
# the same code paths, windowed vision attention included, in the CPU tests.
RANDOM_VL_SHAPES = {
    "vl-tiny-random": (
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             vocab_size=4096, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 12, 12]}),
        dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128, window_size=56,
             fullatt_block_indexes=[1]),
        (56 * 56, 112 * 112)),
    "vl-3b": (
        dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, window_size=112,
             fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        (56 * 56, 448 * 448)),
}


def ensure_random_model(cache_dir: str, shape: str) -> str:
    """A model of RANDOM_SHAPES[shape] (Qwen2) or RANDOM_VL_SHAPES[shape] (Qwen2.5-VL) with random weights and a
    tokenizer of the embedded models', built once."""
    if shape in RANDOM_VL_SHAPES:
        return _ensure(os.path.join(os.path.abspath(cache_dir), f"random-qwen2_5-vl-v1-{shape}"),
                       lambda out: _build_random_vl(out, *RANDOM_VL_SHAPES[shape]))
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random model shape '{shape}': choose one of "
                         f"{sorted(RANDOM_SHAPES) + sorted(RANDOM_VL_SHAPES)}")
    tiny = ensure_tiny_model(cache_dir)
    out = os.path.join(os.path.abspath(cache_dir), f"random-qwen2-v2-{shape}")
    if os.path.isfile(os.path.join(out, "done")):
        return out
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(out, "done")):
            _build_random(out, tiny, RANDOM_SHAPES[shape])
    return out


def ensure_random_reward_model(cache_dir: str, shape: str) -> str:
    """A reward model of RANDOM_SHAPES[shape] (Qwen2ForSequenceClassification, one label) with random bfloat16
    weights and the embedded tokenizer (its chat template included), built once: the reward-model benchmark's."""
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random model shape '{shape}': choose one of {sorted(RANDOM_SHAPES)}")
    tiny = ensure_tiny_model(cache_dir)
    return _ensure(os.path.join(os.path.abspath(cache_dir), f"random-rm-v1-{shape}"),
                   lambda out: _build_random(out, tiny, RANDOM_SHAPES[shape], reward_model=True))


def _build_random(out: str, tiny: str, shape: dict, reward_model: bool = False) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    tokenizer = _full_vocabulary(AutoTokenizer.from_pretrained(tiny), shape["vocab_size"])
    torch.manual_seed(0)
    config = Qwen2Config(**shape, max_position_embeddings=4096, bos_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         torch_dtype="bfloat16", **({"num_labels": 1} if reward_model else {}))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 7B initialises in seconds on a GPU
        model = (Qwen2ForSequenceClassification if reward_model else Qwen2ForCausalLM)(config).to(torch.bfloat16)
    _save(out, model, tokenizer)


def _full_vocabulary(tokenizer, vocab_size: int):
    """The tokenizer with a filler token (' w<n>') for every id it lacks up to vocab_size: the filler tokens are
    never produced by encoding (no merge makes them) but decode to distinct words."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    # Added tokens into the model's vocabulary too: tokenizers gives one missing there the ids after the vocabulary's
    # size on loading, which the fillers would then hold as well (tiny-vl's vision tokens, added after training).
    vocab.update({t["content"]: t["id"] for t in spec["added_tokens"]})
    taken = set(vocab)
    ids = set(vocab.values())
    n = 0
    for i in range(vocab_size):
        if i not in ids:
            while f"Ġw{n}" in taken:
                n += 1
            vocab[f"Ġw{n}"] = i
            n += 1
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
                                   chat_template=tokenizer.chat_template, model_max_length=4096)


def _conversations(data_path: str, tagged_fraction: float = 1.0) -> list[list[dict]]:
    """Every row with its answer, `tagged_fraction` of them (a seeded draw) in <answer> tags, the rest plain."""
    with open(data_path) as f:
        rows = json.load(f)
    rng = random.Random(0)
    convs = []
    for row in rows:
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + list(row["messages"])
        tagged = rng.random() < tagged_fraction
        answer = "<answer>{answer}</answer>" if tagged else rng.choice(PLAIN_ANSWERS)
        convs.append(messages + [{"role": "assistant", "content": answer.format(answer=row["answer"])}])
    return convs


def _train_tokenizer(convs: list[list[dict]]):
    from jinja2 import Template

    template = Template(CHAT_TEMPLATE)
    return _train_tokenizer_on([template.render(messages=c, add_generation_prompt=False) for c in convs])


def _train_tokenizer_on(texts: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=512)


def _build(out: str, data_path: str) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the build runs inside pre-flight checks, whose stderr is one line
    tokenizer = _train_tokenizer(_conversations(data_path))  # on tagged answers: the same tokenizer as before
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    model = Qwen2ForCausalLM(config)
    _warm_up(model, _as_served(tokenizer, config), _conversations(data_path, TAGGED_FRACTION))
    _save(out, model, tokenizer)


def _as_served(tokenizer, config):
    """The tokenizer as transformers and vLLM load it from the model's folder. transformers 5 loads it as the model
    type's class (Qwen2Tokenizer, with Qwen2's pre-tokenizer: " 12" is " ", "1", "2"), which splits text unlike the
    trained object in memory (" 12" one token): a warm-up on the latter taught the model tokens it never sees."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        config.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


def _save(out: str, model, tokenizer, processor=None) -> None:
    """Model, tokenizer (processor) and generation config into out.tmp, a `done` marker, then renamed to out."""
    import shutil

    from transformers import GenerationConfig

    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if processor is not None:
        processor.save_pretrained(tmp)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
    open(os.path.join(tmp, "done"), "w").close()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# Made-up places and people: data/make_search.py draws the bundled corpus from these, and the search model's warm-up
# draws fresh facts from them for every example.
SYLLABLES = ["va", "ren", "ost", "mir", "kal", "dun", "bel", "tor", "ase", "lin", "qua", "zer", "hol", "pen", "dra"]
RELATIONS = [
    ("capital", "The capital of {e} is {v}.", "What is the capital of {e}?"),
    ("river", "The longest river in {e} is the {v}.", "What is the longest river in {e}?"),
    ("founder", "{e} was founded by {v}.", "Who founded {e}?"),
    ("export", "The main export of {e} is {v}.", "What is the main export of {e}?"),
]
GOODS = ["salt", "copper", "wool", "amber", "tin", "glass", "silk", "timber", "honey", "iron"]


def made_up_name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def made_up_value(rng: random.Random, relation: str) -> str:
    return rng.choice(GOODS) if relation == "export" else made_up_name(rng, rng.choice([2, 3]))


def _search_episode(rng: random.Random) -> tuple[list[dict], list[tuple[str, int]]]:
    """A worked episode about a fact made up on the spot: search the question, read the one passage that states
    the fact, answer with it. Segments are (text, 1 model / 0 tool)."""
    entity = made_up_name(rng, 2)
    relation, fact, question = rng.choice(RELATIONS)
    value = made_up_value(rng, relation)
    question = question.format(e=entity)
    prompt = [{"role": "system", "content": SEARCH_SYSTEM}, {"role": "user", "content": question}]
    return prompt, [(f"{SEARCH_OPEN}{question}{SEARCH_CLOSE}", 1),
                    (format_information([fact.format(e=entity, v=value)]), 0), (f"<answer>{value}</answer>", 1)]


def _build_search(out: str) -> None:
    """A tiny Qwen2 with its own tokenizer, warmed up on search episodes about facts made up afresh for every
    example (never the corpus's): it cannot memorise answers, so it learns the skill, copying the question into a
    search and the answer out of what it read. Episodes are tokenized segment by segment exactly as the rollout
    builds them (prompt, model tokens, tool tokens, model tokens, end of turn); the loss is on model tokens only."""
    import torch
    from jinja2 import Template
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    template = Template(CHAT_TEMPLATE)
    rng = random.Random(0)
    texts = [template.render(messages=p, add_generation_prompt=True) + "".join(t for t, _ in e) + "<|im_end|>"
             for p, e in (_search_episode(rng) for _ in range(4000))]
    tokenizer = _train_tokenizer_on(texts, vocab_size=SEARCH_VOCAB)

    def encode(prompt: list[dict], episode: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
        ids = tokenizer(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)["input_ids"]
        labels = [-100] * len(ids)
        for text, is_model in episode:
            part = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids, labels = ids + part, labels + (part if is_model else [-100] * len(part))
        return ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), **SEARCH_SHAPE, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    model = Qwen2ForCausalLM(config)
    _fit(model, tokenizer.pad_token_id, lambda r: [encode(*_search_episode(r)) for _ in range(32)],
         SEARCH_WARMUP_STEPS)
    _save(out, model, tokenizer)


def _fit(model, pad: int, draw, steps: int, seed: int = 1, lr: float = 3e-3, loss=None, extra=()) -> None:
    """Supervised steps on batches from draw(rng), linearly decaying learning rate. A batch is a list of (ids, labels)
    pairs, or the model's keyword arguments ready made (the vision-language warm-up's, with its images); loss(model,
    batch), when given, computes the step's loss instead of the model, and extra are more parameters it trains."""
    import torch

    rng = random.Random(seed)
    optim = torch.optim.AdamW(list(model.parameters()) + list(extra), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(optim, lambda i: max(0.05, 1 - i / steps))
    model.train()
    for _ in range(steps):
        batch = draw(rng)
        batch = batch if isinstance(batch, dict) else _padded(batch, pad)
        (model(**batch).loss if loss is None else loss(model, batch)).backward()
        optim.step()
        decay.step()
        optim.zero_grad()
    model.eval()


def _padded(batch: list[tuple[list[int], list[int]]], pad: int) -> dict:
    """(ids, labels) pairs as right-padded input_ids, attention_mask and labels."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    return dict(input_ids=torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch]),
                attention_mask=torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch]),
                labels=torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in batch]))


def _warm_up(model, tokenizer, convs: list[list[dict]]) -> None:
    """A few supervised steps on the answers: the model learns some arithmetic and, now and then, the format."""
    def encode(conv: list[dict]) -> tuple[list[int], list[int]]:
        prompt = tokenizer.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(conv, tokenize=False)
        p, f = tokenizer(prompt)["input_ids"], tokenizer(full)["input_ids"]
        return f, [-100] * len(p) + f[len(p):]

    import torch

    threads = torch.get_num_threads()
    # One thread: a step of this tiny model took 0.09 s with one or two on 2 idle cores, but two threads that wait
    # for a busy core (other jobs; the tests build the models side by side) made it 0.14-1.2 s against one's 0.07.
    torch.set_num_threads(1)
    try:
        _fit(model, tokenizer.pad_token_id, lambda rng: [encode(c) for c in rng.sample(convs, 32)], WARMUP_STEPS,
             seed=0, lr=WARMUP_LR)
    finally:
        torch.set_num_threads(threads)

# The embedded vision-language model: a tiny Qwen2-VL that answers questions about small drawn images (how many
# shapes, how many of one colour), with the bundled task in data/shapes/ drawn by the same functions.
VL_NAME = "tiny-qwen2-vl-v2"
VISION_TOKENS = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                 "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                 "<|video_pad|>"]
# Qwen2-VL's own template, cut down: string content, or a list of {"type": "image"} / {"type": "text"} items.
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or 'image' in c %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'video' or 'video' in c %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in c %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VL_MIN_PIXELS, VL_MAX_PIXELS = 56 * 56, 112 * 112  # 4 to 16 image tokens: one per 28x28 cell
SHAPE_COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (230, 190, 20)}
SHAPE_KINDS = ("square", "circle", "triangle")
# Sides that are multiples of 28 inside the pixel range: the processor keeps these sizes as they are.
IMAGE_SIZES = ((56, 56), (84, 56), (56, 84), (84, 84), (112, 84), (84, 112), (112, 112))
MAX_SHAPES = 4
# 400 steps: greedy answers right to 46 of the 64 test rows (an image-blind guess: 29). (300 steps, in a try that
# also weighted the answer's digits 10 in the loss: 35 against 43 at 400.)
VL_WARMUP_STEPS = 400
VL_WARMUP_LR = 3e-3
VL_WARMUP_BATCH = 32
VL_CELL_WEIGHT = 1.0  # the weight of the warm-up's cell probe loss (see _warm_up_vl)
VL_WARMUP_TOTAL_FRACTION = 0.75  # warm-up questions asking how many shapes in all (the rest: of one colour)


def draw_shapes(rng: random.Random):
    """A white PIL image of 1-4 filled shapes, at most one in each 28x28 cell (so one image token sees at most
    one shape); returns the image and the shapes' colour names."""
    from PIL import Image, ImageDraw

    width, height = rng.choice(IMAGE_SIZES)
    cells = [(x, y) for x in range(0, width, 28) for y in range(0, height, 28)]
    image = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(image)
    colours = []
    for x, y in rng.sample(cells, rng.randint(1, min(MAX_SHAPES, len(cells)))):
        colour = rng.choice(sorted(SHAPE_COLOURS))
        size = rng.randint(14, 22)
        left, top = x + rng.randint(2, 26 - size + 2), y + rng.randint(2, 26 - size + 2)
        box = (left, top, left + size - 1, top + size - 1)
        kind = rng.choice(SHAPE_KINDS)
        if kind == "square":
            pen.rectangle(box, fill=SHAPE_COLOURS[colour])
        elif kind == "circle":
            pen.ellipse(box, fill=SHAPE_COLOURS[colour])
        else:
            pen.polygon([(left, box[3]), (box[2], box[3]), (left + size // 2, top)], fill=SHAPE_COLOURS[colour])
        colours.append(colour)
    return image, colours


def shape_question(rng: random.Random, colours: list[str]) -> tuple[str, str]:
    """A question about an image of draw_shapes and its numeric answer: how many shapes there are, or how many of
    a colour that the image has."""
    if rng.random() < 0.5:
        return "How many shapes are there?", str(len(colours))
    colour = rng.choice(sorted(set(colours)))
    return f"How many {colour} shapes are there?", str(colours.count(colour))


def vl_model_dir(cache_dir: str) -> str:
    return os.path.join(os.path.abspath(cache_dir), VL_NAME)


def ensure_vl_model(cache_dir: str) -> str:
    """Build the tiny vision-language model unless a complete one is there; safe when several ranks call it."""
    return _ensure(vl_model_dir(cache_dir), _build_vl)


def _vl_example(rng: random.Random, tagged_fraction: float, total_fraction: float | None = None) -> tuple:
    """(image, prompt messages as the data loader gives them, reply): a fresh image and question, the answer in
    <answer> tags for tagged_fraction of them and plain otherwise (as the text model's warm-up). The questions are
    shape_question's, or with total_fraction given, that fraction of them how many shapes there are in all and the
    rest how many of one colour."""
    image, colours = draw_shapes(rng)
    if total_fraction is None:
        question, answer = shape_question(rng, colours)
    elif rng.random() < total_fraction:
        question, answer = "How many shapes are there?", str(len(colours))
    else:
        colour = rng.choice(sorted(set(colours)))
        question, answer = f"How many {colour} shapes are there?", str(colours.count(colour))
    messages = [{"role": "system", "content": DEFAULT_SYSTEM},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    reply = "<answer>{answer}</answer>" if rng.random() < tagged_fraction else rng.choice(PLAIN_ANSWERS)
    return image, messages, reply.format(answer=answer)


def _vl_processor(tokenizer, processor_class, min_pixels: int, max_pixels: int):
    """A Qwen2-VL processor around tokenizer (transformers 5 wants a video processor beside the image one)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    sizes = dict(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2)
    return processor_class(image_processor=Qwen2VLImageProcessor(**sizes),
                           video_processor=Qwen2VLVideoProcessor(**sizes), tokenizer=tokenizer,
                           chat_template=VL_CHAT_TEMPLATE)


def _vl_texts() -> list[str]:
    """Conversations of the task for the tokenizer to learn from, without images: the vision tokens come whole."""
    from jinja2 import Template

    rng = random.Random(0)
    template = Template(VL_CHAT_TEMPLATE)
    texts = []
    for _ in range(2000):
        _, messages, reply = _vl_example(rng, 0.5)
        messages[1]["content"] = messages[1]["content"][1:]
        texts.append(template.render(messages=messages + [{"role": "assistant", "content": reply}]))
    return texts


def _vl_tokenizer(texts: list[str]):
    """The BPE tokenizer trained on texts, with Qwen2-VL's vision tokens added after its own."""
    tokenizer = _train_tokenizer_on(texts)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = VL_CHAT_TEMPLATE
    return tokenizer


def _vl_config(config_class, tokenizer, text: dict, vision: dict, dtype: str):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    return config_class(
        text_config=dict(text, bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=text.get("tie_word_embeddings", False), dtype=dtype)


def _build_vl(out: str) -> None:
    """A tiny Qwen2-VL with its own tokenizer and processor, warmed up on freshly drawn shape images."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = _vl_tokenizer(_vl_texts())
    torch.manual_seed(0)
    config = _vl_config(
        Qwen2VLConfig, tokenizer,
        dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 12, 12]}),
        dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
             temporal_patch_size=2), "float32")
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    processor = _vl_processor(tokenizer, Qwen2VLProcessor, VL_MIN_PIXELS, VL_MAX_PIXELS)
    _warm_up_vl(model, _vl_as_served(processor, config))
    _save(out, model, tokenizer, processor)


def _vl_as_served(processor, config):
    """The processor as transformers and vLLM load it from the model's folder (see _as_served)."""
    import tempfile

    from transformers import AutoProcessor

    with tempfile.TemporaryDirectory() as folder:
        processor.save_pretrained(folder)
        config.save_pretrained(folder)
        return AutoProcessor.from_pretrained(folder)


def vl_batch(processor, examples: list[tuple], image_token_id: int) -> dict:
    """The model's keyword arguments for (image, prompt messages, reply) examples: prompts through the processor
    (image placeholders expanded), reply tokens appended and alone in the labels, as a rollout's completion."""
    import torch

    tokenizer = processor.tokenizer
    prompts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for _, m, _ in examples]
    encoded = processor(text=prompts, images=[image for image, _, _ in examples], padding=True,
                        padding_side="right", return_tensors="pt")
    pairs = []
    for ids, mask, (_, _, reply) in zip(encoded["input_ids"], encoded["attention_mask"], examples):
        prompt = ids[mask.bool()].tolist()
        completion = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        pairs.append((prompt + completion, [-100] * len(prompt) + completion))
    batch = _padded(pairs, tokenizer.pad_token_id)
    batch["mm_token_type_ids"] = (batch["input_ids"] == image_token_id).long()
    return dict(batch, pixel_values=encoded["pixel_values"], image_grid_thw=encoded["image_grid_thw"])


def _cell_labels(image) -> list[int]:
    """What each 28x28 cell of a draw_shapes image holds, in the order of its image tokens (rows of cells): 0 for
    nothing, else 1 + the index of its shape's colour in sorted(SHAPE_COLOURS)."""
    import numpy as np

    width, height = image.size
    cells = np.asarray(image, dtype=np.float32).reshape(height // 28, 28, width // 28, 28, 3).transpose(0, 2, 1, 3, 4)
    cells = cells.reshape(-1, 28 * 28, 3)
    ink = (cells < 250).any(-1)
    means = (cells * ink[..., None]).sum(1) / np.maximum(ink.sum(1), 1)[:, None]
    colours = np.array([SHAPE_COLOURS[c] for c in sorted(SHAPE_COLOURS)], dtype=np.float32)
    nearest = ((means[:, None] - colours[None]) ** 2).sum(-1).argmin(1)
    return [int(n) + 1 if any_ink else 0 for n, any_ink in zip(nearest, ink.any(1))]


def _warm_up_vl(model, processor) -> None:
    """Supervised steps on fresh images: the model learns to read the counts off an image and, now and then, the
    <answer> format. A linear probe, dropped afterwards, learns beside it from each image token what its cell holds
    (nothing, or a shape of which colour), its loss weighted VL_CELL_WEIGHT: without it the tower's tokens of shapes
    and of background stayed alike and the answers image-blind (600 steps, even with the answer's digits weighted 10
    and every question the total, left the digits' loss at the prior's, 1.45); with it that loss fell below 0.8
    within 200 steps. (The digits weighted 10 also made the first reply token a digit more often, and sampled
    replies in <answer> tags rare: 3 in 256, against 45 without.)"""
    import torch

    tokenizer = processor.tokenizer
    probe = torch.nn.Linear(model.config.vision_config.hidden_size, 1 + len(SHAPE_COLOURS))
    features = []
    hook = model.model.visual.register_forward_hook(lambda module, args, out: features.append(out.pooler_output))

    def draw(rng: random.Random) -> dict:
        examples = [_vl_example(rng, TAGGED_FRACTION, VL_WARMUP_TOTAL_FRACTION) for _ in range(VL_WARMUP_BATCH)]
        batch = vl_batch(processor, examples, model.config.image_token_id)
        batch["cells"] = torch.tensor([label for image, _, _ in examples for label in _cell_labels(image)])
        return batch

    def loss(model, batch: dict):
        batch = dict(batch)
        cells = batch.pop("cells")
        features.clear()
        replies = model(**batch).loss
        return replies + VL_CELL_WEIGHT * torch.nn.functional.cross_entropy(probe(torch.cat(features)), cells)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as _warm_up
    try:
        _fit(model, tokenizer.pad_token_id, draw, VL_WARMUP_STEPS, seed=0, lr=VL_WARMUP_LR, loss=loss,
             extra=probe.parameters())
    finally:
        hook.remove()
        torch.set_num_threads(threads)


def _build_random_vl(out: str, text: dict, vision: dict, pixels: tuple[int, int]) -> None:
    """A Qwen2.5-VL of this shape with random bfloat16 weights; the tiny-vl tokenizer (vision tokens at its own ids,
    which the config names) given a filler token for every other id of the vocabulary."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = _full_vocabulary(_vl_tokenizer(_vl_texts()), text["vocab_size"])
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})  # the same ids, marked special
    tokenizer.chat_template = VL_CHAT_TEMPLATE
    config = _vl_config(Qwen2_5_VLConfig, tokenizer, dict(text, max_position_embeddings=4096),
                        dict(vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2), "bfloat16")
    torch.manual_seed(0)
    # bfloat16 from the start: a 3B model initialised in float32 would need twice the memory
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    _save(out, model, tokenizer, _vl_processor(tokenizer, Qwen2_5_VLProcessor, *pixels))


# Models that give rewards (issue 37), for the bundled arithmetic task: a reward model that scores a conversation and
# a judge that answers yes or no. Both learn math_reward at build time, on completions of the kinds a policy writes:
# the tiny policy's own samples and made-up ones (tagged or plain, right or wrong), so that a run rewarded by either
# should move the policy as the rule-based reward does. Each has a tokenizer of its own, unlike the policy's, so
# that the trainer's re-rendering of a completion for another tokenizer is exercised.
RM_NAME = "tiny-rm-v1"
JUDGE_NAME = "tiny-judge-v1"
RM_VOCAB = 384
JUDGE_TEMPLATE = ("Question: {prompt}\nReference answer: {answer}\nResponse: {completion}\n"
                  "Is the response's tagged answer correct? Answer yes or no.")
VERDICTS = ("yes", "no")  # one token each in the judge's tokenizer, its first reply token
REWARD_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1)
# Builds of one to one and a half minutes on 2 cores. With these steps both tell a tagged answer from an untagged one
# every time, but a right tagged answer from a wrong one only 3 to 4 times in 5 (they learn some arithmetic; the judge
# does not learn to compare with the reference in that time: given references that were not the question's answer,
# so that only comparing would do, it did worse).
RM_STEPS = 1000
JUDGE_STEPS = 700
REWARD_LR = 3e-3
POLICY_SAMPLES = 512  # completions sampled from the tiny policy, one per bundled prompt drawn
# (kind, weight): made-up completions of each kind, and the policy's samples (mostly plain, sometimes tagged). Wrong
# tagged answers are as common as right ones so that the tags alone do not earn a high score.
COMPLETION_KINDS = (("right tagged", 0.35), ("wrong tagged", 0.35), ("right plain", 0.1), ("wrong plain", 0.05),
                    ("policy", 0.15))


def ensure_reward_model(cache_dir: str) -> str:
    """A tiny Qwen2ForSequenceClassification (one label, pad_token_id in its config) that scores a conversation of
    the arithmetic task: [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": the prompt's
    user text}, {"role": "assistant", "content": completion}] (the prompt as the trainer's data gives it) rendered by
    its own tokenizer's apply_chat_template(messages, tokenize=False), no generation prompt.
    The score is the logit at the last token that is not padding, as AutoModelForSequenceClassification gives it;
    trained to predict math_reward(completion, answer) (_arith_grade; a logit: above 0 for 1, below for 0)."""
    return _ensure(os.path.join(os.path.abspath(cache_dir), RM_NAME), lambda out: _build_reward(out, cache_dir))


def ensure_judge_model(cache_dir: str) -> str:
    """A tiny Qwen2ForCausalLM judge: given JUDGE_TEMPLATE.format(prompt=user text, completion=..., answer=gold
    answer) as one user message through its tokenizer's chat template with add_generation_prompt=True, its first
    reply token is "yes" if math_reward(completion, answer) is 1, else "no" (each one token), then <|im_end|>."""
    return _ensure(os.path.join(os.path.abspath(cache_dir), JUDGE_NAME), lambda out: _build_judge(out, cache_dir))


def _graded_completions(cache_dir: str, n: int, seed: int) -> list[tuple[str, str, str, float]]:
    """n (user text, completion, gold answer, math_reward) examples of the bundled prompts, their completions drawn
    from COMPLETION_KINDS; the policy's kind from POLICY_SAMPLES samples of the tiny policy."""
    with open(BUNDLED_DATA) as f:
        rows = [(r["messages"][-1]["content"], r["answer"]) for r in json.load(f)]
    rng = random.Random(seed)
    sampled = _policy_samples(cache_dir, rng.sample(rows, POLICY_SAMPLES))
    kinds, weights = zip(*COMPLETION_KINDS)
    examples = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        if kind == "policy":
            examples.append(rng.choice(sampled))
            continue
        text, answer = rng.choice(rows)
        value = answer if kind.startswith("right") else str(rng.choice([v for v in range(26) if str(v) != answer]))
        form = "<answer>{answer}</answer>" if kind.endswith("tagged") else rng.choice(PLAIN_ANSWERS)
        examples.append((text, form.format(answer=value), answer))
    grades = {}
    for text, completion, answer in examples:
        if (completion, answer) not in grades:
            grades[completion, answer] = _arith_grade(completion, answer)
    return [(text, completion, answer, grades[completion, answer]) for text, completion, answer in examples]


def _policy_samples(cache_dir: str, rows: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(user text, completion, answer): one completion sampled from the tiny policy for each row, as a run's first
    rollout would (the default system prompt, 16 new tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_tiny_model(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.manual_seed(0)
    out = []
    for i in range(0, len(rows), 128):
        part = rows[i:i + 128]
        prompts = [tokenizer.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM},
                                                  {"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=False) for text, _ in part]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = policy.generate(**batch, do_sample=True, max_new_tokens=16)
        completions = tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [(text, completion, answer) for (text, answer), completion in zip(part, completions)]
    return out


def _reward_config(tokenizer, **extra):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=len(tokenizer), **REWARD_SHAPE, max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
                       **extra)


def _single_threaded(fit) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as _warm_up
    try:
        fit()
    finally:
        torch.set_num_threads(threads)


def _arith_grade(completion: str, answer: str) -> float:
    """math_reward on this task (the rule rewards live above the leaves): 1.0 if the last <answer>...</answer> holds
    the integer answer (math-verify's equality of plain numbers), else 0.0."""
    close = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, close) if close >= 0 else -1
    if start < 0:
        return 0.0
    try:
        return float(float(completion[start + len("<answer>"):close].strip()) == float(answer))
    except ValueError:
        return 0.0


def _build_reward(out: str, cache_dir: str) -> None:
    """The reward model: a regression of math_reward (binary cross-entropy on the score) over graded completions."""
    import torch
    from jinja2 import Template
    from transformers import Qwen2ForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    examples = _graded_completions(cache_dir, 8000, seed=0)
    template = Template(CHAT_TEMPLATE)

    def conversation(text: str, completion: str) -> list[dict]:  # as the trainer renders it: the system prompt too
        return [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": text},
                {"role": "assistant", "content": completion}]

    tokenizer = _train_tokenizer_on([template.render(messages=conversation(t, c)) for t, c, _, _ in examples],
                                    vocab_size=RM_VOCAB)
    torch.manual_seed(0)
    config = _reward_config(tokenizer, num_labels=1)
    model = Qwen2ForSequenceClassification(config)
    served = _as_served(tokenizer, config)
    encoded = [(served(served.apply_chat_template(conversation(t, c), tokenize=False),
                       add_special_tokens=False)["input_ids"], grade) for t, c, _, grade in examples]

    def draw(rng: random.Random) -> dict:
        pairs = rng.sample(encoded, 32)
        batch = _padded([(ids, []) for ids, _ in pairs], served.pad_token_id)
        return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    grades=torch.tensor([grade for _, grade in pairs]))

    def loss(model, batch: dict):
        batch = dict(batch)
        grades = batch.pop("grades")
        scores = model(**batch).logits[:, 0]
        return torch.nn.functional.binary_cross_entropy_with_logits(scores, grades)

    _single_threaded(lambda: _fit(model, served.pad_token_id, draw, RM_STEPS, seed=0, lr=REWARD_LR, loss=loss))
    _save(out, model, tokenizer)


def _build_judge(out: str, cache_dir: str) -> None:
    """The judge: supervised on its verdict for graded completions, the loss on the verdict and <|im_end|> only."""
    import torch
    from jinja2 import Template
    from transformers import Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    examples = _graded_completions(cache_dir, 8000, seed=1)
    template = Template(CHAT_TEMPLATE)

    def question(text: str, completion: str, answer: str) -> list[dict]:
        return [{"role": "user", "content": JUDGE_TEMPLATE.format(prompt=text, completion=completion, answer=answer)}]

    tokenizer = _train_tokenizer_on(
        [template.render(messages=question(t, c, a) + [{"role": "assistant", "content": VERDICTS[grade != 1.0]}])
         for t, c, a, grade in examples], vocab_size=RM_VOCAB)
    torch.manual_seed(0)
    config = _reward_config(tokenizer)
    model = Qwen2ForCausalLM(config)
    served = _as_served(tokenizer, config)
    verdicts = [served(v, add_special_tokens=False)["input_ids"] for v in VERDICTS]
    if any(len(v) != 1 for v in verdicts):
        raise RuntimeError(f"the judge's verdicts are not one token each: {verdicts}")

    def encode(text: str, completion: str, answer: str, grade: float) -> tuple[list[int], list[int]]:
        prompt = served(served.apply_chat_template(question(text, completion, answer), add_generation_prompt=True,
                                                   tokenize=False), add_special_tokens=False)["input_ids"]
        reply = verdicts[grade != 1.0] + [served.eos_token_id]
        return prompt + reply, [-100] * len(prompt) + reply

    encoded = [encode(*e) for e in examples]
    _single_threaded(lambda: _fit(model, served.pad_token_id, lambda rng: rng.sample(encoded, 32), JUDGE_STEPS,
                                  seed=0, lr=REWARD_LR))
    _save(out, model, tokenizer)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the embedded models into a cache folder.")
    parser.add_argument("cache_dir", nargs="?", default=".cache")
    parser.add_argument("--random", choices=sorted(RANDOM_SHAPES) + sorted(RANDOM_VL_SHAPES),
                        help="a random model of this shape instead")
    parser.add_argument("--vl", action="store_true", help="the tiny vision-language model ('tiny-vl') instead")
    parser.add_argument("--rm", action="store_true",
                        help="the tiny reward model ('tiny-rm') and judge ('tiny-judge') instead, one folder a line")
    args = parser.parse_args()
    if args.rm:
        print(ensure_reward_model(args.cache_dir))
        print(ensure_judge_model(args.cache_dir))
    else:
        print(ensure_random_model(args.cache_dir, args.random) if args.random
              else ensure_vl_model(args.cache_dir) if args.vl else ensure_tiny_model(args.cache_dir))
