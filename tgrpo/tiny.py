"""The embedded default model: a tiny Qwen2 and a BPE tokenizer trained here, built once into the cache folder.

No hub is reached: the tokenizer is trained with `tokenizers` on the bundled data, the model is initialised from a
`Qwen2Config` (head_dim 64, which vLLM's CPU attention accepts) and given a short supervised warm-up on the bundled
problems, so that GRPO starts from a model that sometimes answers right, as it would from an SFT checkpoint. Most
warm-up answers are plain text, as in SFT data written for another purpose: the model knows some arithmetic but
seldom writes it in the <answer> format the math reward reads, which GRPO then teaches it within the default run.

    python -m tgrpo.tiny [cache_dir]                # build (or find) it and print its folder
    python -m tgrpo.tiny [cache_dir] --random 0.5b  # a randomly initialised model of that shape (benchmarks)

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
EMBEDDED = ("tiny", "tiny-search")  # the `model` names built here


def tiny_model_dir(cache_dir: str) -> str:
    return os.path.join(os.path.abspath(cache_dir), TINY_NAME)


def ensure_tiny_model(cache_dir: str) -> str:
    """Build the tiny model unless a complete one is there; safe when several ranks call it at once."""
    return _ensure(tiny_model_dir(cache_dir), lambda out: _build(out, BUNDLED_DATA))


def ensure_search_model(cache_dir: str) -> str:
    """The tiny model of the multi-turn search example: warmed up on search traces over the bundled corpus."""
    return _ensure(os.path.join(os.path.abspath(cache_dir), SEARCH_NAME), _build_search)


def ensure_model(cache_dir: str, name: str) -> str:
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


def ensure_random_model(cache_dir: str, shape: str) -> str:
    """A Qwen2 model of RANDOM_SHAPES[shape] with random weights and the tiny tokenizer, built once."""
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random model shape '{shape}': choose one of {sorted(RANDOM_SHAPES)}")
    tiny = ensure_tiny_model(cache_dir)
    out = os.path.join(os.path.abspath(cache_dir), f"random-qwen2-v2-{shape}")
    if os.path.isfile(os.path.join(out, "done")):
        return out
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(out, "done")):
            _build_random(out, tiny, RANDOM_SHAPES[shape])
    return out


def _build_random(out: str, tiny: str, shape: dict) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _full_vocabulary(AutoTokenizer.from_pretrained(tiny), shape["vocab_size"])
    torch.manual_seed(0)
    config = Qwen2Config(**shape, max_position_embeddings=4096, bos_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         torch_dtype="bfloat16")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 7B initialises in seconds on a GPU
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    _save(out, model, tokenizer)


def _full_vocabulary(tokenizer, vocab_size: int):
    """The tokenizer with a filler token (' w<n>') for every id it lacks up to vocab_size: the filler tokens are
    never produced by encoding (no merge makes them) but decode to distinct words."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    taken = set(vocab) | {t["content"] for t in spec["added_tokens"]}
    ids = set(vocab.values()) | {t["id"] for t in spec["added_tokens"]}
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


def _save(out: str, model, tokenizer) -> None:
    """Model, tokenizer and generation config into out.tmp, a `done` marker, then renamed to out."""
    import shutil

    from transformers import GenerationConfig

    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
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


def _fit(model, pad: int, draw, steps: int, seed: int = 1, lr: float = 3e-3) -> None:
    """Supervised steps on batches of (ids, labels) pairs from draw(rng), linearly decaying learning rate."""
    import torch

    rng = random.Random(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(optim, lambda i: max(0.05, 1 - i / steps))
    model.train()
    for _ in range(steps):
        batch = draw(rng)
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        label_ids = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in batch])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=attention, labels=label_ids).loss
        loss.backward()
        optim.step()
        decay.step()
        optim.zero_grad()
    model.eval()


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


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the embedded models into a cache folder.")
    parser.add_argument("cache_dir", nargs="?", default=".cache")
    parser.add_argument("--random", choices=sorted(RANDOM_SHAPES), help="a random model of this shape instead")
    args = parser.parse_args()
    print(ensure_random_model(args.cache_dir, args.random) if args.random else ensure_tiny_model(args.cache_dir))
