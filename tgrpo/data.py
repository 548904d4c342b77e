"""Prompts: loaded with `datasets`, checked row by row, put through the chat template, handed out per step.

Accepted data: a .json file (a JSON list or JSON lines), a .jsonl file, a .parquet file, or a folder written by
`Dataset.save_to_disk` (a `DatasetDict` folder too: its 'train' split, or its only split). The prompt is the column
`prompt_column` ('messages'; a missing 'messages' falls back to 'conversations'), holding chatml messages
{role, content}, ShareGPT messages {from: human|gpt|system, value}, or a plain string; a trailing assistant turn
is cut off (the model generates the answer, which is in `answer_column`). An answer is a string or a number; a
JSON object or a list there is refused, naming the row. Blank lines of a JSON lines file are skipped (as datasets
skips them) and rows are counted without them; a line that is not JSON is named by its line number in the file.

Images (vision-language models, given `vision`): a message's content may be a list of items, {"type": "text",
"text": ...} and {"type": "image"} (TRL), or items carrying their image, {"type": "image", "image": ...} and
{"type": "image_url", "image_url": {"url": ...}} (OpenAI); `<image>` in a message's text marks where an image goes
(verl, EasyR1, LLaVA). Images without one of their own are taken from `image_column` ('images', else 'image'; a list
or one image) in order; a row whose messages mark no place for them has them at the start of its first user
message (as TRL does). An image is a path (relative to the data file's folder, else to the working directory, as
verl and TRL read them), a file:// or data: URI, its bytes, or datasets.Image's {bytes, path}; http(s) URLs are
refused. Each image's header is read here (that it is an image, and its size), its pixels only by the ranks that
use it; prompt_ids hold as many image tokens per image as the processor gives it.

The order is a deterministic shuffle per epoch, so the prompts of step s depend only on (seed, s): a resumed run
continues with the same prompts, and rollout rank i takes the i-th slice of the step's prompts.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tgrpo.errors import ConfigError
from tgrpo.vision import ImageRef, VisionProcessor, image_ref

FORMATS = ("a .json file (JSON list or JSON lines), a .jsonl file, a .parquet file, or a folder written by "
           "datasets' save_to_disk")
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_FALLBACK_PROMPT_COLUMN = "conversations"  # used when the default 'messages' column is missing
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
_CHUNK = 512  # rows put through the chat template and tokenized at once
_FALLBACK_IMAGE_COLUMN = "image"  # used when the default 'images' column is missing
PLACEHOLDER = "<image>"
_HEADER_READERS = 8  # image headers read at once (a network filesystem's latency, not the CPU, is their cost)


@dataclass
class Prompt:
    prompt_ids: list[int]
    prompt_text: str
    answer: str
    # with keep_columns (reward functions written for TRL): the prompt as the dataset gave it (chat messages, the
    # system prompt added; a plain string stays a string) and every other column of its row, by name
    prompt: list[dict] | str | None = None
    columns: dict | None = None
    # vision-language rows: the images in the order of their tokens in prompt_ids (prompt_text holds one
    # <|image_pad|> for each, prompt_ids as many as the processor gives the image)
    images: list[ImageRef] | None = None


def _first_line(e: BaseException) -> str:
    """The first line of the innermost cause: datasets wraps the real parse error in generic ones."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ if e.__cause__ is not None else e.__context__
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _read(path: str, label: str):
    """The rows of `path` as a `datasets.Dataset`."""
    import datasets

    datasets.disable_progress_bars()
    if not path or not os.path.exists(path):
        raise ConfigError(f"{label} '{path}' does not exist: give {FORMATS}")
    if os.path.isdir(path):
        try:
            rows = datasets.load_from_disk(path)
        except Exception as e:
            raise ConfigError(f"{label} '{path}' is a folder but could not be read by datasets.load_from_disk "
                              f"({_first_line(e)}): give {FORMATS}") from None
        if isinstance(rows, datasets.DatasetDict):
            splits = list(rows)
            if "train" in rows:
                return rows["train"]
            if len(splits) == 1:
                return rows[splits[0]]
            raise ConfigError(f"{label} '{path}' is a DatasetDict with splits {splits} and none named 'train': "
                              "save the split to use on its own, or name it 'train'")
        return rows
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDERS:
        raise ConfigError(f"{label} '{path}' has an unknown extension '{ext}': give {FORMATS}")
    if _holds_no_rows(path, _BUILDERS[ext]):
        raise ConfigError(f"{label} '{path}' is empty (no rows): put the prompts there, as {FORMATS}")
    try:
        with _quiet_datasets():
            return datasets.load_dataset(_BUILDERS[ext], data_files=path, split="train")
    except Exception as e:  # datasets wraps parse errors in several types; the innermost says what broke
        problem = (_bad_json(path) if _BUILDERS[ext] == "json" else None) or f"as {ext} rows: {_first_line(e)}"
        raise ConfigError(f"{label} '{path}' could not be read {problem}") from None


def _holds_no_rows(path: str, builder: str) -> bool:
    """An empty file, or JSON that holds nothing (`[]`, blank lines): datasets says only 'StopIteration'."""
    if os.path.getsize(path) == 0:
        return True
    if builder != "json" or os.path.getsize(path) > 1 << 16:
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().removeprefix("\ufeff").strip() in ("", "[]")


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs its own line for a file it cannot parse (to stderr) before raising: the ConfigError says it."""
    from datasets.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _bad_json(path: str) -> str | None:
    """Where a .json/.jsonl file that datasets refused stops being JSON, by its line number in the file (datasets
    names a row within one block of the file, or a byte position), and the fix; None if it parses."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read().removeprefix("\ufeff")
    if text.lstrip().startswith("["):  # one JSON list, possibly over many lines
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return (f"(not JSON at line {e.lineno} column {e.colno}: {e.msg}): fix the file (a JSON list of rows, or "
                    "one JSON object per line)")
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            why = "it ends mid-row, cut off?" if e.pos >= len(line.rstrip()) else f"{e.msg} at column {e.colno}"
            return f"(line {number} is not JSON: {why}): fix or remove that line (one JSON object per line)"
        if not isinstance(row, dict):
            return (f"(line {number} holds a JSON {type(row).__name__}, not a row): give one JSON object per line, "
                    "{\"messages\": ..., \"answer\": ...}")
    return None


def _message(m, row: int, column: str, label: str) -> dict:
    """One message as {role, content}, from chatml {role, content} or ShareGPT {from, value}; a content list is
    a string again when it holds text items only, else a list of {"type": "text", "text"} and {"type": "image",
    "image": the image value, or None where the image column gives it}."""
    if not isinstance(m, dict):
        raise ConfigError(f"{label} row {row}: '{column}' holds no prompt (a message is {type(m).__name__}, want "
                          "{role, content} or {from, value}): fix the row or set --prompt_column")
    role, content = m.get("role"), m.get("content")
    if role is None and m.get("from") is not None:  # ShareGPT (both kinds of keys may exist after Arrow unifies)
        source = str(m["from"])
        role = _SHAREGPT_ROLES.get(source.lower())
        if role is None:
            raise ConfigError(f"{label} row {row}: '{column}' holds a message from '{source}': ShareGPT 'from' "
                              f"must be one of {sorted(_SHAREGPT_ROLES)}")
    if content is None:
        content = m.get("value")
    if isinstance(content, (list, tuple)):
        content = _items(content, row, column, label)
    if not role or not isinstance(content, (str, list)):
        raise ConfigError(f"{label} row {row}: '{column}' holds no prompt (want a list of {{role, content}} or "
                          "{from, value} messages or a string): fix the row or set --prompt_column")
    return {"role": str(role), "content": content}


def _items(items, row: int, column: str, label: str) -> str | list[dict]:
    """A content list's items (TRL's and OpenAI's shapes); keys Arrow added as null to unify the rows are ignored."""
    out = []
    for item in items:
        if isinstance(item, str):
            out.append({"type": "text", "text": item})
            continue
        if not isinstance(item, dict):
            raise ConfigError(f"{label} row {row}: '{column}' holds a content item that is {type(item).__name__}: "
                              "give {\"type\": \"text\", \"text\": ...} or {\"type\": \"image\"} items")
        item = {k: v for k, v in item.items() if v is not None}
        kind = item.get("type") or next((k for k in ("text", "image", "image_url") if k in item), None)
        if kind == "text":
            out.append({"type": "text", "text": str(item.get("text", ""))})
        elif kind == "image":
            out.append({"type": "image", "image": item.get("image")})
        elif kind == "image_url":
            url = item.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if url is None:
                raise ConfigError(f"{label} row {row}: '{column}' holds an image_url item without a url: give "
                                  "{\"type\": \"image_url\", \"image_url\": {\"url\": path or data: URI}}")
            out.append({"type": "image", "image": url})
        else:
            raise ConfigError(f"{label} row {row}: '{column}' holds a content item of type '{kind}': only text and "
                              "image items are taken")
    if all(i["type"] == "text" for i in out):
        return "".join(i["text"] for i in out)
    return out


def _place_images(messages: list[dict], given: list, where: str, column: str | None) -> tuple[list[dict], list]:
    """The messages as the chat template takes them ({"type": "image"} where each image goes) and the image values
    in that order: items carrying their image keep it; <image> in the text and bare image items take the images of
    the image column in order; with neither, those go before the first user message's text."""
    slots = 0
    for m in messages:
        if isinstance(m["content"], str) and PLACEHOLDER in m["content"]:
            pieces = m["content"].split(PLACEHOLDER)
            m["content"] = [item for k, piece in enumerate(pieces) for item in
                            ([{"type": "image", "image": None}] if k else []) +
                            ([{"type": "text", "text": piece}] if piece else [])]
        if isinstance(m["content"], list):
            slots += sum(i["type"] == "image" and i["image"] is None for i in m["content"])
    if given and not slots:
        first = (next((m for m in messages if m["role"] == "user"), None)
                 or next(m for m in messages if m["role"] != "system"))
        text = first["content"]
        first["content"] = [{"type": "image", "image": None} for _ in given] + (
            text if isinstance(text, list) else [{"type": "text", "text": text}] if text else [])
        slots = len(given)
    if slots != len(given):
        marks = f"{slots} place{'s' * (slots != 1)} for an image (<image> in the text, or {{\"type\": \"image\"}})"
        held = (f"'{column}' holds {len(given)}" if column else "there is no image column (--image_column)")
        raise ConfigError(f"{where}: its messages mark {marks} but {held}: give one image per place, in order")
    images, column_images = [], iter(given)
    for m in messages:
        if isinstance(m["content"], list):
            for item in m["content"]:
                if item["type"] == "image":
                    value = item.pop("image")
                    images.append(next(column_images) if value is None else value)
    return messages, images


def _messages(value, row: int, column: str, label: str) -> list[dict]:
    """The prompt's messages: a string becomes one user turn; a trailing assistant turn (the answer) is cut."""
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}] if value.strip() else []
    elif isinstance(value, (list, tuple)):
        messages = [_message(m, row, column, label) for m in value]
    else:
        messages = []
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not any(m["role"] != "system" for m in messages):
        raise ConfigError(f"{label} row {row}: '{column}' holds no prompt (want a list of {{role, content}} or "
                          "{from, value} messages or a string, with a turn besides the system and final assistant "
                          "ones): fix the row or set --prompt_column")
    return messages


def _answer(value, row: int, column: str, label: str) -> str | None:
    """The reference answer as a string; None when missing. Integral floats (Arrow turns a column of ints and
    floats into floats) are written as ints: 3.0 -> '3'. A JSON object or a list is a ConfigError: written as text
    ("{'value': 2}") it would be the reference every completion is scored against. datasets reads a column of mixed
    types as JSON values (its `Json` feature), so such a row no longer fails the file: it is refused here."""
    if value is None:
        return None
    if isinstance(value, (dict, list, tuple)):
        kind = "a JSON object" if isinstance(value, dict) else "a list"
        shown = json.dumps(value, default=str)
        raise ConfigError(f"{label} row {row}: '{column}' holds {kind} ({shown[:60]}{'...' * (len(shown) > 60)}), "
                          "not an answer: give the reference answer as a string or a number")
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    text = str(value)
    return text if text.strip() else None


def _label(cfg, path: str | None) -> str:
    if path is None or path == cfg.train_data:
        return "train_data"
    if path == getattr(cfg, "eval_data", None):
        return "eval_data"
    return f"data '{path}'"


def load_prompts(cfg, tokenizer, path: str | None = None, *, limit: int | None = None,
                 need: int | None = None, keep_columns: bool = False,
                 vision: VisionProcessor | None = None) -> tuple[list[Prompt], int]:
    """The usable prompts of `path` (default cfg.train_data) and the number dropped for being longer than
    max_prompt_length.

    limit: stop after this many usable prompts (the first ones; later rows are not read). need: fewest usable
    prompts, else ConfigError (default cfg.prompts_per_step). Every row read is checked; a bad one is a ConfigError.
    keep_columns: each Prompt also holds its prompt as the dataset gave it and its row's other columns (the reward
    functions written for TRL get them by name). vision: the model's processor (VisionProcessor.load); None for a
    text-only model, which refuses rows that hold images.
    """
    label = _label(cfg, path)
    path = cfg.train_data if path is None else path
    rows = _read(path, label)
    columns = rows.column_names
    prompt_column = cfg.prompt_column
    if prompt_column not in columns and prompt_column == "messages" and _FALLBACK_PROMPT_COLUMN in columns:
        prompt_column = _FALLBACK_PROMPT_COLUMN
    for column in (prompt_column, cfg.answer_column):
        if column not in columns:
            raise ConfigError(f"{label} '{path}' has no column '{column}' (columns: {columns}): set --prompt_column "
                              "/ --answer_column")
    if "judge" in cfg.reward_funcs:  # the judge's template fills its fields from the row
        from tgrpo.reward_spec import template_fields

        unknown = [f for f in template_fields(cfg.judge_template)
                   if f not in ("prompt", "completion", "answer") and f not in columns]
        if unknown:
            raise ConfigError(f"judge_template names '{{{unknown[0]}}}', which is no column of {label} '{path}' "
                              f"(columns: {columns}): use {{prompt}}, {{completion}}, {{answer}} or one of them")
    image_column = _image_column(cfg, columns, label, path)
    if not keep_columns:
        rows = rows.select_columns(list(dict.fromkeys([prompt_column, cfg.answer_column,
                                                       *([image_column] if image_column else [])])))
    if image_column:
        rows = _undecoded(rows, image_column)
    if limit is not None and limit <= 0:
        rows = rows.select([])
    base_dir = os.path.dirname(os.path.abspath(path))
    prompts: list[Prompt] = []
    dropped = 0
    row = 0
    others = [c for c in rows.column_names if c != prompt_column] if keep_columns else []
    for batch in _chunks(rows, label, path):
        texts, answers, extras, found = [], [], [], []
        for j, (value, raw_answer) in enumerate(zip(batch[prompt_column], batch[cfg.answer_column])):
            messages = _messages(value, row, prompt_column, label)
            answer = _answer(raw_answer, row, cfg.answer_column, label)
            if answer is None:
                raise ConfigError(f"{label} row {row}: no answer in '{cfg.answer_column}': every row needs one")
            given = _as_list(batch[image_column][j]) if image_column else []
            if vision is not None:
                messages, images = _place_images(messages, given, f"{label} row {row}", image_column)
            elif given or any(isinstance(m["content"], list) for m in messages):  # lists hold images (_items)
                raise ConfigError(f"{label} row {row} holds images, but model '{cfg.model}' has no vision tower: "
                                  "take a vision-language model (Qwen2-VL, Qwen2.5-VL), or data without images")
            else:
                images = []
            if cfg.system_prompt and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": cfg.system_prompt}] + messages
            texts.append(tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False,
                **({"chat_template": vision.chat_template} if vision is not None and vision.chat_template else {})))
            answers.append(answer)
            found.append([(image, f"{label} row {row} image {k + 1} of {len(images)}")
                          for k, image in enumerate(images)])
            extras.append((value if isinstance(value, str) else messages, {c: batch[c][j] for c in others})
                          if keep_columns else (None, None))
            row += 1
        refs = _image_refs(found, base_dir)
        first_row = row - len(texts)
        for k, (text, ids, answer, (given, columns), images) in enumerate(zip(
                texts, tokenizer(texts, add_special_tokens=False)["input_ids"], answers, extras, refs)):
            if images:
                ids = _expanded(ids, images, vision, cfg, f"{label} row {first_row + k}")
            if len(ids) > cfg.max_prompt_length:
                dropped += 1
                continue
            prompts.append(Prompt(list(ids), text, answer, given, columns, images or None))
            if limit is not None and len(prompts) >= limit:
                break
        if limit is not None and len(prompts) >= limit:
            break
    wanted = f"prompts_per_step={cfg.prompts_per_step}" if need is None else f"the {need} needed"
    need = cfg.prompts_per_step if need is None else need
    if len(prompts) < need:
        raise ConfigError(f"{label} has {len(prompts)} usable prompts ({dropped} longer than max_prompt_length="
                          f"{cfg.max_prompt_length}), fewer than {wanted}")
    return prompts, dropped


def _image_column(cfg, columns: list[str], label: str, path: str) -> str | None:
    """The column of the rows' images: image_column, or 'image' for a missing default 'images'; None if neither
    (images may still be in the messages)."""
    if cfg.image_column in columns:
        return cfg.image_column
    if cfg.image_column == "images":
        return _FALLBACK_IMAGE_COLUMN if _FALLBACK_IMAGE_COLUMN in columns else None
    raise ConfigError(f"{label} '{path}' has no column '{cfg.image_column}' (columns: {columns}): set "
                      "--image_column")


def _undecoded(rows, column: str):
    """The rows with a datasets.Image column (or a list of them) left as {bytes, path}: the images' pixels are
    decoded by the ranks that use them, not all at load time."""
    import datasets

    feature = rows.features[column]
    if isinstance(feature, datasets.Image):
        return rows.cast_column(column, datasets.Image(decode=False))
    if isinstance(feature, (datasets.List, datasets.LargeList)) and isinstance(feature.feature, datasets.Image):
        return rows.cast_column(column, type(feature)(datasets.Image(decode=False)))
    return rows


def _as_list(value) -> list:
    """A row's images: a list, one image, or none."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _image_refs(found: list[list[tuple]], base_dir: str) -> list[list[ImageRef]]:
    """Each row's (image value, where) as ImageRefs, their headers read by a few threads, each a slice of them (the
    latency of a network filesystem is their cost); the first bad one in row order is the ConfigError."""
    flat = [item for images in found for item in images]
    size = max(64, -(-len(flat) // _HEADER_READERS))
    slices = [flat[start:start + size] for start in range(0, len(flat), size)]

    def read(items):
        return [image_ref(value, where, base_dir) for value, where in items]

    if len(slices) > 1:
        with ThreadPoolExecutor(len(slices)) as pool:
            refs = iter([ref for part in pool.map(read, slices) for ref in part])
    else:
        refs = iter(read(flat))
    return [[next(refs) for _ in images] for images in found]


def _expanded(ids: list[int], images: list[ImageRef], vision: VisionProcessor, cfg, where: str) -> list[int]:
    """The prompt's ids with each image's tokens, as the processor expands them; a ConfigError for a prompt whose
    image tokens alone are more than max_prompt_length, or whose text holds image tokens of its own."""
    tokens = []
    for image in images:
        try:
            tokens.append(vision.tokens_for(*image.size))
        except ValueError as e:
            raise ConfigError(f"{where}: image '{image.label}' is {image.size[0]}x{image.size[1]}, which the "
                              f"processor refuses ({_first_line(e)}): crop or pad it") from None
    if sum(tokens) > cfg.max_prompt_length:
        sizes = ", ".join(f"{w}x{h}" for w, h in (image.size for image in images[:3])) + ", ..." * (len(images) > 3)
        raise ConfigError(f"{where}: its {len(images)} image{'s' * (len(images) != 1)} ({sizes}) alone take "
                          f"{sum(tokens)} tokens, more than max_prompt_length={cfg.max_prompt_length}: lower "
                          f"max_pixels (now {vision.max_pixels}: up to {vision.max_pixels // vision.pixels_per_token} "
                          "tokens an image) or raise max_prompt_length")
    held = sum(t == vision.image_token_id for t in ids)
    if held != len(images):
        raise ConfigError(f"{where}: its templated text holds {held} image tokens for {len(images)} images (the "
                          "text spells the image token itself, or the chat template leaves images out): remove "
                          "<|image_pad|> from the text, or check the model's chat template")
    return vision.expand(ids, tokens)


def _chunks(rows, label: str, path: str):
    """The rows _CHUNK at a time; a value that datasets cannot decode (seen: a dict keyed by a NUL character) is a
    ConfigError naming the rows, not the library's KeyError."""
    chunks = iter(rows.iter(batch_size=_CHUNK))
    start = 0
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - whatever datasets raises while decoding a row
            raise ConfigError(f"{label} '{path}' rows {start}-{start + _CHUNK - 1} could not be decoded "
                              f"({type(e).__name__}: {_first_line(e)}): check the values of those rows") from None
        yield chunk
        start += _CHUNK


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
