"""Property-based bad input (hypothesis): whatever a user writes in a config or a data file, the outcome is a
valid config or one ConfigError line, never another exception."""
import json
import typing
from dataclasses import fields

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import check
from tgrpo.config import Config, ConfigError, load_config

# every field but the folders the checks write into (output_dir is made and probed, cache_dir gets the tiny model)
NAMES = [f.name for f in fields(Config) if f.name not in ("output_dir", "cache_dir")]

# values of every YAML type, including the near misses users type: negative, zero, huge, strings of numbers
values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "auto", "all", "0-1", "1-0", "0,2-3", "abc", "-1", "1e-4", "true", "tiny", "math",
                       "zero3.json", "gather", "partitions", "group", "dapo", "k3"]) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=2),
    max_leaves=4)
configs = st.dictionaries(st.sampled_from(NAMES + ["not_a_field"]), values, max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(configs)
def test_any_yaml_config_is_accepted_or_one_config_error(tmp_path, entries):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(entries))
    try:
        cfg = load_config(["--config", str(path)])
        check(cfg, 3, 3)
    except ConfigError as e:
        text = str(e)
        assert text and "\n" not in text.strip(), text
    # anything else (TypeError, KeyError, ...) fails the test


flags = st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(
    ["0", "-1", "3", "0.5", "nan", "inf", "abc", "true", "all", "0-9", "", "1e9"])), max_size=3)


@settings(max_examples=300, deadline=None)
@given(flags)
def test_any_command_line_flags_are_accepted_or_one_config_error(pairs):
    argv = [token for name, value in pairs for token in (f"--{name}", value)]
    try:
        check(load_config(argv), 3, 3)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e).strip()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tgrpo.tiny import ensure_tiny_model

    return AutoTokenizer.from_pretrained(ensure_tiny_model(".cache"))


message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "", 3]),
                                 "content": values})
rows = st.lists(st.dictionaries(st.sampled_from(["messages", "answer", "conversations", "prompt", "extra"]),
                                values | st.lists(message | values, max_size=3), max_size=3),
                min_size=1, max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows)
def test_any_data_rows_load_or_give_one_config_error(tmp_path, tokenizer, data):
    from tgrpo.data import load_prompts

    path = tmp_path / "rows.json"
    path.write_text(json.dumps(data))
    cfg = Config(train_data=str(path), prompts_per_step=1)
    try:
        prompts, _ = load_prompts(cfg, tokenizer)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e).strip(), str(e)
        return
    for p in prompts:  # what loads is usable: token ids and a non-empty answer
        assert p.prompt_ids and all(isinstance(t, int) for t in p.prompt_ids) and p.answer


def test_hints_cover_every_field():
    """The strategies above name fields by the dataclass; a typing change must keep the parser total."""
    assert set(typing.get_type_hints(Config)) == set(NAMES) | {"output_dir", "cache_dir"}
