"""Data loading: every accepted format gives the same prompts, prompt shapes (chatml, ShareGPT, strings, trailing
assistant turns), row checks with one-line errors, long-prompt dropping, and the per-epoch order."""
import json
import os

import pytest

from tgrpo import data
from tgrpo.config import Config, ConfigError
from tgrpo.tiny import DEFAULT_SYSTEM, ensure_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "data", "arith_train.json")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_tiny_model(os.path.join(ROOT, ".cache")))


@pytest.fixture(scope="module")
def rows():
    with open(BUNDLED) as f:
        return json.load(f)[:40]


def cfg(path, **overrides):
    values = dict(train_data=str(path), prompts_per_step=1, max_prompt_length=256)
    values.update(overrides)
    return Config(**values)


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(path, tokenizer, **overrides):
    return data.load_prompts(cfg(path, **overrides), tokenizer)


def error(path, tokenizer, **overrides) -> str:
    with pytest.raises(ConfigError) as e:
        load(path, tokenizer, **overrides)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_every_format_loads_the_same_prompts(tmp_path, tokenizer, rows):
    import datasets

    reference, dropped = load(write_json(tmp_path / "list.json", rows), tokenizer)
    assert dropped == 0 and len(reference) == 40
    assert [p.answer for p in reference] == [str(r["answer"]) for r in rows]
    first = reference[0]
    assert DEFAULT_SYSTEM in first.prompt_text and rows[0]["messages"][0]["content"] in first.prompt_text
    assert first.prompt_text.endswith("<|im_start|>assistant\n")
    assert first.prompt_ids == tokenizer(first.prompt_text, add_special_tokens=False)["input_ids"]

    ds = datasets.Dataset.from_list(rows)
    paths = [write_jsonl(tmp_path / "lines.json", rows), write_jsonl(tmp_path / "rows.jsonl", rows)]
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    paths.append(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    paths.append(str(tmp_path / "saved"))
    other = datasets.Dataset.from_list(rows[:3])
    datasets.DatasetDict({"test": other, "train": ds}).save_to_disk(str(tmp_path / "dict"))
    paths.append(str(tmp_path / "dict"))
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "only_split"))
    paths.append(str(tmp_path / "only_split"))
    for path in paths:
        assert load(path, tokenizer) == (reference, 0), path


def test_format_errors_are_one_line(tmp_path, tokenizer, rows):
    import datasets

    csv = tmp_path / "rows.csv"
    csv.write_text("messages,answer\nhi,1\n")
    for path in (csv, tmp_path / "missing.json"):
        message = error(path, tokenizer)
        assert str(path) in message and ".jsonl" in message and ".parquet" in message and "save_to_disk" in message
    (tmp_path / "plain").mkdir()
    assert "save_to_disk" in error(tmp_path / "plain", tokenizer)
    ds = datasets.Dataset.from_list(rows[:3])
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "two"))
    message = error(tmp_path / "two", tokenizer)
    assert "'a'" in message and "'b'" in message and "train" in message
    bad = tmp_path / "bad.json"
    bad.write_text('[{"messages": "hi", "answer": 1},')
    assert "could not be read" in error(bad, tokenizer)


def test_sharegpt_conversations(tmp_path, tokenizer):
    sharegpt = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "1 + 2?"},
                                   {"from": "gpt", "value": "3"}], "answer": 3},
                {"conversations": [{"from": "human", "value": "2 + 2?"}], "answer": 4}]
    chatml = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 2?"}],
               "answer": "3"},
              {"messages": [{"role": "user", "content": "2 + 2?"}], "answer": "4"}]
    got, _ = load(write_json(tmp_path / "sharegpt.json", sharegpt), tokenizer)
    want, _ = load(write_json(tmp_path / "chatml.json", chatml), tokenizer)
    assert got == want
    assert [p.answer for p in got] == ["3", "4"]
    assert got[0].prompt_text.count("<|im_start|>system") == 1 and "Be brief." in got[0].prompt_text
    assert "<|im_start|>gpt" not in got[0].prompt_text and "<|im_start|>human" not in got[0].prompt_text

    unknown = [{"conversations": [{"from": "robot", "value": "hi"}], "answer": 1}]
    message = error(write_json(tmp_path / "unknown.json", unknown), tokenizer)
    assert "row 0" in message and "robot" in message


def test_string_prompts_and_numeric_answers(tmp_path, tokenizer):
    strings = [{"messages": "What is 1 + 1?", "answer": 2}, {"messages": "Half of 5?", "answer": 2.5},
               {"messages": "A word?", "answer": "yes"}]
    chatml = [{"messages": [{"role": "user", "content": r["messages"]}], "answer": r["answer"]} for r in strings]
    got, _ = load(write_json(tmp_path / "strings.json", strings), tokenizer)
    want, _ = load(write_json(tmp_path / "chatml.json", chatml), tokenizer)
    assert got == want
    assert [p.answer for p in got] == ["2", "2.5", "yes"]
    # a column of ints and floats becomes float64 in Arrow: the ints still read back as ints
    numbers = [{"messages": "a?", "answer": 3}, {"messages": "b?", "answer": 2.5}]
    got, _ = load(write_jsonl(tmp_path / "numbers.jsonl", numbers), tokenizer)
    assert [p.answer for p in got] == ["3", "2.5"]


def test_trailing_assistant_turn_is_dropped(tmp_path, tokenizer):
    user, reply = {"role": "user", "content": "1 + 2?"}, {"role": "assistant", "content": "<answer>3</answer>"}
    follow = {"role": "user", "content": "times 2?"}
    cases = [{"messages": [user, reply], "answer": "3"}, {"messages": [user, reply, follow, reply], "answer": "6"}]
    expected = [{"messages": [user], "answer": "3"}, {"messages": [user, reply, follow], "answer": "6"}]
    got, _ = load(write_json(tmp_path / "trailing.json", cases), tokenizer)
    want, _ = load(write_json(tmp_path / "expected.json", expected), tokenizer)
    assert got == want
    assert got[0].prompt_text.endswith("1 + 2?<|im_end|>\n<|im_start|>assistant\n")
    assert got[1].prompt_text.count("<answer>3</answer>") == 1  # earlier turns stay


def test_system_prompt_only_when_absent(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "system", "content": "Own system."}, {"role": "user", "content": "1 + 1?"}],
             "answer": "2"},
            {"messages": [{"role": "user", "content": "2 + 2?"}], "answer": "4"}]
    path = write_json(tmp_path / "system.json", rows)
    own, added = load(path, tokenizer)[0]
    assert own.prompt_text.count("<|im_start|>system") == 1 and "Own system." in own.prompt_text
    assert DEFAULT_SYSTEM not in own.prompt_text
    assert added.prompt_text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
    own, bare = load(path, tokenizer, system_prompt="")[0]
    assert "Own system." in own.prompt_text and "<|im_start|>system" not in bare.prompt_text


def test_long_prompts_are_dropped_and_counted(tmp_path, tokenizer):
    rows = [{"messages": "What is " + " + ".join(["1"] * n) + "?", "answer": str(n)} for n in range(1, 21)]
    path = write_json(tmp_path / "lengths.json", rows)
    everything, dropped = load(path, tokenizer)
    assert dropped == 0 and len(everything) == 20
    lengths = [len(p.prompt_ids) for p in everything]
    limit = sorted(lengths)[12]
    kept, dropped = load(path, tokenizer, max_prompt_length=limit)
    assert dropped == sum(n > limit for n in lengths) and dropped > 0
    assert kept == [p for p in everything if len(p.prompt_ids) <= limit]
    message = error(path, tokenizer, max_prompt_length=limit, prompts_per_step=20)
    assert f"{len(kept)} usable prompts ({dropped} longer than max_prompt_length={limit})" in message
    assert "prompts_per_step=20" in message


def test_limit_need_and_eval_path(tmp_path, tokenizer, rows):
    train = write_json(tmp_path / "train.json", rows)
    evals = write_json(tmp_path / "eval.json", rows[:10])
    config = cfg(train, eval_data=evals, prompts_per_step=16)
    everything, _ = data.load_prompts(config, tokenizer)
    first, dropped = data.load_prompts(config, tokenizer, evals, limit=4, need=1)
    assert dropped == 0 and first == everything[:4]
    assert len(data.load_prompts(config, tokenizer, evals, limit=256, need=1)[0]) == 10
    with pytest.raises(ConfigError) as e:
        data.load_prompts(config, tokenizer, evals, need=11)
    assert str(e.value).startswith("eval_data has 10 usable prompts") and "the 11 needed" in str(e.value)
    with pytest.raises(ConfigError) as e:
        data.load_prompts(config, tokenizer, str(tmp_path / "nothing.json"), need=1)
    assert "does not exist" in str(e.value)


@pytest.mark.parametrize("bad, words", [
    ({"messages": [{"role": "user", "content": "1 + 1?"}], "answer": ""}, "no answer in 'answer'"),
    ({"messages": [{"role": "user", "content": "1 + 1?"}], "answer": None}, "no answer in 'answer'"),
    ({"messages": [{"role": "user", "content": "1 + 1?"}]}, "no answer in 'answer'"),
    ({"messages": [], "answer": "3"}, "'messages' holds no prompt"),
    ({"messages": "  ", "answer": "3"}, "'messages' holds no prompt"),
    ({"messages": None, "answer": "3"}, "'messages' holds no prompt"),
    ({"messages": [{"role": "assistant", "content": "3"}], "answer": "3"}, "'messages' holds no prompt"),
    ({"messages": [{"role": "system", "content": "Be brief."}], "answer": "3"}, "'messages' holds no prompt"),
    ({"messages": [{"role": "user"}], "answer": "3"}, "'messages' holds no prompt"),
])
def test_bad_rows_name_the_row_in_one_line(tmp_path, tokenizer, bad, words):
    good = {"messages": [{"role": "user", "content": "1 + 1?"}], "answer": "2"}
    for suffix, write in ((".json", write_json), (".jsonl", write_jsonl)):
        message = error(write(tmp_path / f"bad{suffix}", [good] * 7 + [bad] + [good]), tokenizer)
        assert "row 7" in message and words in message and message.startswith("train_data row 7: "), message


def test_wrong_columns(tmp_path, tokenizer):
    rows = [{"question": "1 + 1?", "solution": "2"}] * 3
    path = write_json(tmp_path / "columns.json", rows)
    message = error(path, tokenizer)
    assert "no column 'messages'" in message and "question" in message and "--prompt_column" in message
    message = error(path, tokenizer, prompt_column="question")
    assert "no column 'answer'" in message and "--answer_column" in message
    got, _ = load(path, tokenizer, prompt_column="question", answer_column="solution")
    assert len(got) == 3 and got[0].answer == "2"
    # the 'conversations' fallback is for the default column only, not for a column the user named
    convs = write_json(tmp_path / "convs.json", [{"conversations": "1 + 1?", "answer": 2}])
    assert len(load(convs, tokenizer)[0]) == 1
    assert "no column 'prompt'" in error(convs, tokenizer, prompt_column="prompt")


def test_step_indices_shuffle_per_epoch():
    n, per_step = 10, 5
    epoch0 = data.step_indices(n, per_step, 0, seed=1) + data.step_indices(n, per_step, 1, seed=1)
    epoch1 = data.step_indices(n, per_step, 2, seed=1) + data.step_indices(n, per_step, 3, seed=1)
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    assert epoch0 != data.step_indices(n, per_step, 0, seed=2) + data.step_indices(n, per_step, 1, seed=2)
    assert all(data.step_indices(n, per_step, s, seed=1) == data.step_indices(n, per_step, s, seed=1)
               for s in range(6))
    # steps that straddle an epoch boundary: every epoch is still a permutation
    positions = [i for s in range(5) for i in data.step_indices(n, 4, s, seed=3)]
    assert sorted(positions[:n]) == list(range(n)) and sorted(positions[n:]) == list(range(n))


def test_rank_slice_splits_evenly():
    items = list(range(12))
    for parts in (1, 2, 3, 4, 6):
        slices = [data.rank_slice(items, i, parts) for i in range(parts)]
        assert all(len(s) == 12 // parts for s in slices)
        assert [x for s in slices for x in s] == items


def test_a_value_datasets_cannot_decode_is_one_line(tmp_path, tokenizer):
    """Found by the property test: an answer dict keyed by a NUL character makes datasets raise KeyError while it
    decodes the rows; the user gets one line naming the rows."""
    path = tmp_path / "nul.json"
    path.write_text(json.dumps([{"messages": [], "answer": {"\x00": {}}}]))
    with pytest.raises(ConfigError, match=r"rows 0-511 could not be decoded \(KeyError"):
        data.load_prompts(Config(train_data=str(path)), tokenizer)
