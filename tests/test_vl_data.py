"""Vision-language data: every convention users bring (verl's <image> placeholders and images column, TRL's content
lists, OpenAI's image items; paths, bytes, datasets.Image, data: URIs) gives the same prompts; prompt_ids equal the
processor's own expansion for 0, 1 and 2 images of mixed sizes and modes; bad input is one line naming the row, from
load_prompts and under node.sh and plain torchrun, before any engine starts."""
import base64
import json
import os
import sys
from pathlib import Path

import pytest
from helpers import ROOT, free_port, run, torchrun
from PIL import Image
from vl_fixtures import image, tiny_vl_model

from tgrpo import data
from tgrpo.config import Config
from tgrpo.errors import ConfigError
from tgrpo.vision import VisionProcessor

CACHE = os.path.join(ROOT, ".cache")
# the three rows of every convention: 1 image, 2 images of other sizes (one a JPEG), none
QUESTIONS = ["<image>What is shown?", "Compare <image> with <image>.", "No image here."]
SIZES = {"a.png": (84, 112), "b.png": (56, 56), "c.jpg": (300, 40)}
IMAGES = [["a.png"], ["b.png", "c.jpg"], []]
GOOD = {"messages": [{"role": "user", "content": "<image>What is shown?"}], "images": ["imgs/a.png"], "answer": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_vl_model(CACHE, str(tmp_path_factory.mktemp("vl") / "tiny-vl"))


@pytest.fixture(scope="module")
def vision(model):
    return VisionProcessor.load(model)


@pytest.fixture(scope="module")
def tokenizer(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


@pytest.fixture(scope="module")
def processor(model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model)


@pytest.fixture
def pictures(tmp_path):
    """The images in tmp_path/imgs, by name -> absolute path."""
    (tmp_path / "imgs").mkdir()
    return {name: image(str(tmp_path / "imgs" / name), *size, seed=k) for k, (name, size) in enumerate(SIZES.items())}


def cfg(path, model="tiny", **overrides):
    return Config(**{"train_data": str(path), "prompts_per_step": 1, "max_prompt_length": 256, "model": model,
                     **overrides})


def load(path, tokenizer, vision, **overrides):
    return data.load_prompts(cfg(path, **overrides), tokenizer, vision=vision)


def error(path, tokenizer, vision, **overrides) -> str:
    with pytest.raises(ConfigError) as e:
        load(path, tokenizer, vision, **overrides)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def write(path, rows) -> str:
    """rows as a JSON list (.json) or JSON lines (.jsonl)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        if str(path).endswith(".jsonl"):
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            json.dump(rows, f)
    return str(path)


def verl_rows(images):
    return [{"messages": [{"role": "user", "content": q}], "images": i, "answer": str(k)}
            for k, (q, i) in enumerate(zip(QUESTIONS, images))]


def content(question: str, item) -> list[dict]:
    """The question as a content list, each <image> an item made by item(k) for the k-th image."""
    out = []
    for k, piece in enumerate(question.split("<image>")):
        if k:
            out.append(item(k - 1))
        if piece:
            out.append({"type": "text", "text": piece})
    return out


def data_uri(path: str) -> str:
    kind = "jpeg" if path.endswith(".jpg") else "png"
    with open(path, "rb") as f:
        return f"data:image/{kind};base64," + base64.b64encode(f.read()).decode()


def conventions(tmp_path, pictures) -> dict[str, str]:
    """The same three rows in every convention: name -> the path to load."""
    import datasets

    absolute = [[pictures[n] for n in names] for names in IMAGES]
    paths = {
        "json, relative paths": write(tmp_path / "verl.json", verl_rows([[f"imgs/{n}" for n in i] for i in IMAGES])),
        "jsonl, absolute paths and a file:// URI": write(tmp_path / "elsewhere" / "rows.jsonl", verl_rows(
            [absolute[0], ["file://" + absolute[1][0], absolute[1][1]], []])),
        # a string prompt and the 'image' column (the fallback of 'images')
        "string prompt, 'image' column": write(tmp_path / "strings.json", [
            {"messages": q, "image": [f"imgs/{n}" for n in i], "answer": str(k)}
            for k, (q, i) in enumerate(zip(QUESTIONS, IMAGES))]),
        "TRL content lists": write(tmp_path / "trl.json", [
            {"messages": [{"role": "user", "content": content(q, lambda _: {"type": "image"})}], "images": i,
             "answer": str(k)} for k, (q, i) in enumerate(zip(QUESTIONS, absolute))]),
        # images inside the messages: image_url with a path and with a data: URI, an image item with a data: URI
        "OpenAI image items": write(tmp_path / "openai.json", [
            {"messages": [{"role": "user", "content": content(q, lambda j, items=items: items[j])}], "answer": str(k)}
            for k, (q, items) in enumerate(zip(QUESTIONS, [
                [{"type": "image_url", "image_url": {"url": pictures["a.png"]}}],
                [{"type": "image", "image": data_uri(pictures["b.png"])},
                 {"type": "image_url", "image_url": {"url": data_uri(pictures["c.jpg"])}}],
                []]))]),
    }
    features = datasets.Features({"messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
                                  "images": datasets.List(datasets.Image()), "answer": datasets.Value("string")})
    as_bytes = [[{"bytes": Path(p).read_bytes(), "path": None} for p in i] for i in absolute]
    datasets.Dataset.from_list(verl_rows(as_bytes), features=features).to_parquet(str(tmp_path / "bytes.parquet"))
    paths["parquet, image bytes"] = str(tmp_path / "bytes.parquet")
    datasets.Dataset.from_list(verl_rows(absolute), features=features).save_to_disk(str(tmp_path / "saved"))
    paths["save_to_disk, datasets.Image"] = str(tmp_path / "saved")
    return paths


def test_every_convention_gives_the_same_prompts(tmp_path, pictures, tokenizer, vision):
    found = {name: load(path, tokenizer, vision) for name, path in conventions(tmp_path, pictures).items()}
    reference, dropped = found.pop("json, relative paths")
    assert dropped == 0 and [len(p.images or []) for p in reference] == [1, 2, 0]
    assert [p.images[0].label for p in reference[:2]] == ["imgs/a.png", "imgs/b.png"]
    assert [p.images[0].size for p in reference[:2]] == [(84, 112), (56, 56)] and reference[2].images is None
    pixels = [[i.open().tobytes() for i in p.images or []] for p in reference]
    for name, (prompts, dropped) in found.items():
        assert dropped == 0, name
        assert [p.prompt_ids for p in prompts] == [p.prompt_ids for p in reference], name
        assert [p.prompt_text for p in prompts] == [p.prompt_text for p in reference], name
        assert [[i.size for i in p.images or []] for p in prompts] == [[i.size for i in p.images or []]
                                                                      for p in reference], name
        assert [[i.open().tobytes() for i in p.images or []] for p in prompts] == pixels, name
    # what a remote reward service is told: the path, or the sha1 of the bytes
    assert reference[0].images[0].ref() == pictures["a.png"]
    assert found["parquet, image bytes"][0][0].images[0].ref().startswith("sha1:")
    json.dumps([i.ref() for p in found["parquet, image bytes"][0] for i in p.images or []])


def test_relative_paths_missing_beside_the_data_are_read_from_the_working_directory(tmp_path, pictures, tokenizer,
                                                                                     vision, monkeypatch):
    """verl and TRL scripts open relative paths from where they run: a path not found beside the data file is read
    from the working directory."""
    path = write(tmp_path / "data" / "rows.json", [GOOD])
    monkeypatch.chdir(tmp_path)
    (prompt,), _ = load(path, tokenizer, vision)
    assert prompt.images[0].ref() == pictures["a.png"] and prompt.images[0].label == "imgs/a.png"
    monkeypatch.chdir(tmp_path / "data")
    assert f"does not exist (not as {tmp_path}/data/imgs/a.png, nor in the working directory" in error(
        path, tokenizer, vision)


def test_images_without_a_place_go_before_the_first_user_text(tmp_path, pictures, tokenizer, vision):
    """TRL's rule for an images column whose messages mark no place: the images open the first user message."""
    system = {"role": "system", "content": "Look closely."}
    marked = write(tmp_path / "marked.json", [
        {"messages": [system, {"role": "user", "content": "<image><image>Which is larger?"}],
         "images": ["imgs/a.png", "imgs/c.jpg"], "answer": "a"}])
    unmarked = write(tmp_path / "unmarked.json", [
        {"messages": [system, {"role": "user", "content": "Which is larger?"}],
         "images": ["imgs/a.png", "imgs/c.jpg"], "answer": "a"}])
    (first,), _ = load(marked, tokenizer, vision)
    assert load(unmarked, tokenizer, vision)[0] == [first]
    assert first.prompt_text.count("<|image_pad|>") == 2 and "Look closely." in first.prompt_text
    assert first.prompt_text.index("<|vision_start|>") > first.prompt_text.index("<|im_start|>user")


def test_prompt_ids_are_the_processors_expansion(tmp_path, tokenizer, vision, processor):
    """For 0, 1 and 2 images of mixed sizes and modes (tiny, above max_pixels, EXIF-rotated, transparent,
    grayscale, paletted), prompt_ids equal processor(text, images)'s input_ids, pixels() its pixel_values and
    image_grid_thw, and collapse() the unexpanded ids vLLM takes."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = {"small": image(str(folder / "small.png"), 10, 10), "big": image(str(folder / "big.png"), 1000, 700, 1),
             "wide": image(str(folder / "wide.png"), 400, 30, 2)}
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: stored 60x150, seen 150x60
    Image.open(image(str(folder / "tmp.png"), 60, 150, 3)).save(folder / "rotated.jpg", exif=exif)
    paths["rotated"] = str(folder / "rotated.jpg")
    rgba = Image.open(image(str(folder / "tmp2.png"), 90, 70, 4)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((90, 70)))
    rgba.save(folder / "alpha.png")
    paths["alpha"] = str(folder / "alpha.png")
    Image.open(paths["wide"]).convert("L").save(folder / "gray.png")
    Image.open(paths["big"]).convert("P").save(folder / "palette.png")
    paths.update(gray=str(folder / "gray.png"), palette=str(folder / "palette.png"))
    groups = [[], ["small"], ["big", "rotated"], ["alpha", "gray"], ["palette", "wide"], ["rotated"]]
    rows = [{"messages": [{"role": "user", "content": "Say it " + "<image> " * len(g) + "now."}],
             "images": [paths[n] for n in g], "answer": "x"} for g in groups]
    prompts, dropped = load(write(tmp_path / "rows.json", rows), tokenizer, vision, max_prompt_length=1024)
    assert dropped == 0 and len(prompts) == len(groups)
    assert prompts[2].images[1].size == (150, 60)
    for prompt, group in zip(prompts, groups):
        images = [i.open() for i in prompt.images or []]
        assert [i.size for i in images] == [i.size for i in prompt.images or []]
        expected = processor(text=[prompt.prompt_text], images=images or None, return_tensors="pt")
        assert prompt.prompt_ids == expected["input_ids"][0].tolist(), group
        assert vision.collapse(prompt.prompt_ids) == tokenizer(prompt.prompt_text,
                                                               add_special_tokens=False)["input_ids"]
        if images:
            pixel_values, grid = vision.pixels(images)
            assert grid.tolist() == expected["image_grid_thw"].tolist()
            assert pixel_values.equal(expected["pixel_values"])
            assert [vision.tokens_for(*i.size) for i in images] == (grid.prod(-1) // 4).tolist()
            assert prompt.prompt_ids.count(vision.image_token_id) == sum(grid.prod(-1) // 4)
    assert vision.tokens_for(1000, 700) == 12  # capped by max_pixels: resized to 112x84


def test_images_open_upright_in_rgb_as_datasets_and_vllm_see_them(tmp_path):
    """Every EXIF orientation turns the pixels as ImageOps.exif_transpose does, and the header's size is the turned
    one; transparency is laid on white as transformers does it."""
    from PIL import ImageOps

    from tgrpo.vision import image_ref

    stored = Image.open(image(str(tmp_path / "stored.png"), 40, 24))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        for name in (f"o{orientation}.jpg", f"o{orientation}.png", f"o{orientation}.webp"):
            stored.save(tmp_path / name, exif=exif)
            ref = image_ref(name, "image", str(tmp_path))
            upright = ImageOps.exif_transpose(Image.open(tmp_path / name)).convert("RGB")
            assert ref.size == upright.size == ((24, 40) if orientation >= 5 else (40, 24)), name
            assert ref.open().tobytes() == upright.tobytes(), name
    clear = Image.new("RGBA", (8, 8), (10, 200, 30, 0))
    clear.save(tmp_path / "clear.png")
    assert image_ref("clear.png", "image", str(tmp_path)).open().getpixel((0, 0)) == (255, 255, 255)


def test_pixel_bounds_reach_the_processor_the_engine_and_a_checkpoint(tmp_path, model):
    from transformers import AutoProcessor

    low, high = 28 * 28 * 8, 28 * 28 * 30
    bounded = VisionProcessor.load(model, min_pixels=low, max_pixels=high)
    reference = AutoProcessor.from_pretrained(model, size={"shortest_edge": low, "longest_edge": high})
    picture = Image.open(image(str(tmp_path / "p.png"), 300, 200))
    expected = reference(text=["<|image_pad|>"], images=[picture], return_tensors="pt")
    assert bounded.tokens_for(300, 200) == expected["image_grid_thw"].prod() // 4 == 24  # resized to 168x112
    assert bounded.pixels([picture])[0].equal(expected["pixel_values"])
    assert bounded.engine_kwargs() == {"min_pixels": low, "max_pixels": high}
    assert VisionProcessor.load(model).engine_kwargs() == {}
    only_max = VisionProcessor.load(model, max_pixels=28 * 28 * 6)
    assert (only_max.min_pixels, only_max.max_pixels) == (56 * 56, 28 * 28 * 6)
    bounded.save(str(tmp_path / "checkpoint"))
    saved = AutoProcessor.from_pretrained(str(tmp_path / "checkpoint"))
    assert saved(text=["<|image_pad|>"], images=[picture], return_tensors="pt")["input_ids"].equal(
        expected["input_ids"])
    with pytest.raises(ConfigError, match="min_pixels 3136 is above max_pixels 1000 .the min_pixels of model"):
        VisionProcessor.load(model, max_pixels=1000)


def test_qwen2_5_vl_expands_as_its_processor(tmp_path, pictures):
    from transformers import AutoProcessor, AutoTokenizer
    from vl_fixtures import build

    from tgrpo.tiny import ensure_tiny_model

    folder = str(tmp_path / "q25")
    build(ensure_tiny_model(CACHE), folder, "qwen2_5_vl")
    vision, tokenizer = VisionProcessor.load(folder), AutoTokenizer.from_pretrained(folder)
    prompts, _ = load(write(tmp_path / "rows.json", verl_rows([[f"imgs/{n}" for n in i] for i in IMAGES])),
                      tokenizer, vision)
    processor = AutoProcessor.from_pretrained(folder)
    for prompt in prompts:
        images = [i.open() for i in prompt.images or []]
        assert prompt.prompt_ids == processor(text=[prompt.prompt_text], images=images or None)["input_ids"][0]


def bad_rows(case: str) -> list[dict]:
    """Seven good rows, then the bad one (row 7), then a good one."""
    bad = {
        "missing image": {**GOOD, "images": ["imgs/nothere.png"]},
        "not an image": {**GOOD, "images": ["notes.png"]},
        "URL": {**GOOD, "images": ["https://example.com/cat.png"]},
        "too many places": {**GOOD, "messages": [{"role": "user", "content": "<image> and <image>?"}]},
        "too few places": {**GOOD, "messages": [{"role": "user", "content": "<image>?"}],
                           "images": ["imgs/a.png"] * 3},
        "null image": {**GOOD, "images": [None]},
        "bad data URI": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}]}], "images": [], "answer": "1"},
        "image_url without url": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {}}]}], "images": [], "answer": "1"},
        "video item": {"messages": [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}],
                       "images": [], "answer": "1"},
        "aspect ratio": {**GOOD, "images": ["imgs/thin.png"]},
        "spelled image token": {**GOOD, "messages": [{"role": "user", "content": "<image>Is <|image_pad|> here?"}]},
        "image tokens alone": {**GOOD, "messages": [{"role": "user", "content": "What?"}],
                               "images": ["imgs/a.png"] * 9},
    }[case]
    return [GOOD] * 7 + [bad, GOOD]


BAD_ROWS = {
    "missing image": "train_data row 7 image 1 of 1 'imgs/nothere.png' does not exist (not as ",
    "not an image": "train_data row 7 image 1 of 1 'notes.png' cannot be read as an image (UnidentifiedImageError",
    "URL": "train_data row 7 image 1 of 1 'https://example.com/cat.png' is a URL: download the images first",
    "too many places": "train_data row 7: its messages mark 2 places for an image (<image> in the text, or "
                       "{\"type\": \"image\"}) but 'images' holds 1: give one image per place, in order",
    "too few places": "train_data row 7: its messages mark 1 place for an image",
    "null image": "train_data row 7 image 1 of 1 is null, not an image",
    "bad data URI": "train_data row 7 image 1 of 1 'data:image/png;base64,@@@@' is a data: URI whose base64 does "
                    "not decode",
    "image_url without url": "train_data row 7: 'messages' holds an image_url item without a url",
    "video item": "train_data row 7: 'messages' holds a content item of type 'video': only text and image items",
    "aspect ratio": "train_data row 7: image 'imgs/thin.png' is 420x2, which the processor refuses (absolute aspect "
                    "ratio must be smaller than 200",
    "spelled image token": "train_data row 7: its templated text holds 2 image tokens for 1 images",
    "image tokens alone": "train_data row 7: its 9 images (84x112, 84x112, 84x112, ...) alone take 108 tokens, more "
                          "than max_prompt_length=100: lower max_pixels (now 12544: up to 16 tokens an image) or "
                          "raise max_prompt_length",
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_image_rows_name_the_row_in_one_line(tmp_path, pictures, tokenizer, vision, case):
    (tmp_path / "notes.png").write_text("not a picture")
    image(str(tmp_path / "imgs" / "thin.png"), 420, 2)
    path = write(tmp_path / "bad.json", bad_rows(case))
    message = error(path, tokenizer, vision, max_prompt_length=100)
    assert message.startswith(BAD_ROWS[case]), message


def test_long_prompts_are_dropped_with_a_count(tmp_path, pictures, tokenizer, vision):
    """Text and image tokens together over max_prompt_length: dropped and counted, as text prompts are."""
    rows = verl_rows([[f"imgs/{n}" for n in i] for i in IMAGES])
    lengths = [len(p.prompt_ids) for p in load(write(tmp_path / "rows.json", rows), tokenizer, vision)[0]]
    assert lengths[1] > lengths[0] > lengths[2]
    prompts, dropped = load(tmp_path / "rows.json", tokenizer, vision, max_prompt_length=lengths[0])
    assert dropped == 1 and [len(p.prompt_ids) for p in prompts] == [lengths[0], lengths[2]]


def test_a_text_model_refuses_images(tmp_path, pictures):
    from transformers import AutoTokenizer

    from tgrpo.tiny import ensure_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model(CACHE))
    assert VisionProcessor.load(ensure_tiny_model(CACHE)) is None
    column = write(tmp_path / "column.json", [{"messages": "1 + 1?", "images": [], "answer": "2"}] * 3 + [GOOD])
    inline = write(tmp_path / "inline.json", [{"messages": [{"role": "user", "content": [
        {"type": "text", "text": "1 + 1?"}]}], "answer": "2"}] * 2 + [{"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "imgs/a.png"}}, {"type": "text", "text": "?"}]}],
            "answer": "2"}])
    for path, row in ((column, 3), (inline, 2)):
        message = error(path, tokenizer, None)
        assert message == (f"train_data row {row} holds images, but model 'tiny' has no vision tower: take a "
                           "vision-language model (Qwen2-VL, Qwen2.5-VL), or data without images"), message
    # text-only content lists and an empty images column are a text model's prompts; <image> stays text
    text = write(tmp_path / "text.json", [{"messages": [{"role": "user", "content": [
        {"type": "text", "text": "1 + "}, {"type": "text", "text": "1?"}]}], "images": [], "answer": "2"},
        {"messages": "Draw <image> here", "answer": "3"}])
    first, second = load(text, tokenizer, None)[0]
    assert "1 + 1?" in first.prompt_text and first.images is None and "Draw <image> here" in second.prompt_text


def test_a_named_image_column_must_exist(tmp_path, pictures, tokenizer, vision):
    path = write(tmp_path / "rows.json", [GOOD])
    assert "has no column 'pictures'" in error(path, tokenizer, vision, image_column="pictures")
    assert len(load(path, tokenizer, vision)[0]) == 1
    renamed = write(tmp_path / "renamed.json", [{**GOOD, "pictures": GOOD["images"], "images": None}])
    assert load(renamed, tokenizer, vision, image_column="pictures")[0][0].images[0].label == "imgs/a.png"


def test_check_job_refuses_tool_episodes_with_a_vision_model(tmp_path, model):
    from helpers import check

    config = cfg(os.path.join(ROOT, "data", "arith_train.json"), model=model, retriever_url="http://127.0.0.1:9",
                 output_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError) as e:
        check(config, 3)
    assert str(e.value) == (f"model '{model}' is a vision-language model, and multi-turn tool episodes "
                            "(retriever_url) do not take images yet: leave retriever_url empty, or take a text model")


def _one_line(result, words: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr[-3000:]
    assert "EngineCore" not in result.stdout + result.stderr  # nothing started


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing image", "too many places", "image tokens alone", "text model"])
def test_node_sh_says_bad_image_rows_in_one_line(tmp_path, pictures, model, case):
    args, words = _bad_input(tmp_path, model, case)
    result = run(["bash", "launch/node.sh", "0", "127.0.0.1", "--", "--output_dir", str(tmp_path / "out"), *args],
                 timeout=600, env={"PYTHON": sys.executable, "MASTER_PORT": str(free_port())})
    _one_line(result, words)


def _bad_input(tmp_path, model: str, case: str) -> tuple[list[str], str]:
    """The job's arguments for a case of bad input, and the words its one line says."""
    if case == "text model":  # images in a text model's data
        return ["--train_data", write(tmp_path / "bad.json", [GOOD] * 9)], "has no vision tower"
    if case == "retriever":  # tool episodes with a vision model
        return ["--model", model, "--retriever_url", "http://127.0.0.1:9"], "do not take images yet"
    (tmp_path / "notes.png").write_text("not a picture")
    return (["--model", model, "--train_data", write(tmp_path / "bad.json", bad_rows(case)), "--max_prompt_length",
             "100"], BAD_ROWS[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing image", "too many places", "image tokens alone", "text model", "retriever"])
def test_plain_torchrun_says_bad_image_input_in_one_line(tmp_path, pictures, model, case):
    """Without node.sh's pre-flight: every rank refuses tool episodes with a vision model; the rollout rank finds
    the bad rows (or images in a text model's data) before its engine starts, and the job ends in one line."""
    args, words = _bad_input(tmp_path, model, case)
    result = torchrun(["train_grpo.py", *args, "--output_dir", str(tmp_path / "out")], timeout=300)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert len(ours) == 1 and words in ours[0], result.stderr[-3000:]
    assert "EngineCore" not in result.stdout + result.stderr
