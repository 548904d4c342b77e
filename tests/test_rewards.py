"""tgrpo.rollout.rewards on real answer strings: math-verify equivalence, malformed output, format, threads, and the
RewardScorer with builtin and user rewards and its config checks (the remote service: test_remote_reward.py)."""
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import ROOT
from tgrpo.rollout import rewards
from tgrpo.config import Config, ConfigError
from tgrpo.rollout.rewards import (REWARD_FUNCS, RewardError, RewardScorer, Row, check_reward_config, extract_answer,
                           format_reward, math_reward)

# (completion, gold answer): equivalent forms that must earn 1.0
CORRECT = [
    ("<answer>7</answer>", "7"),
    ("<answer>-3</answer>", "-3"),
    ("<answer>-\\frac{1}{2}</answer>", "-0.5"),
    ("<answer>0.5</answer>", "\\frac{1}{2}"),
    ("<answer>1/2</answer>", "0.5"),
    ("<answer>\\frac{3}{4}</answer>", "3/4"),
    ("<answer>\\dfrac{3}{4}</answer>", "0.75"),
    ("<answer>\\frac12</answer>", "1/2"),
    ("<answer>7.0</answer>", "7"),
    ("<answer>7</answer>", "\\frac{14}{2}"),
    ("<answer>$7$</answer>", "7"),
    ("<answer>\\(7\\)</answer>", "7"),
    ("<answer>\\boxed{7}</answer>", "7"),
    ("<answer>$\\boxed{\\frac{1}{2}}$</answer>", "0.5"),
    ("<answer>The answer is 7</answer>", "7"),
    ("<answer>7 apples</answer>", "7"),
    ("<answer>x = 7</answer>", "7"),
    ("<answer>  7 \n</answer>", "7"),
    ("<answer>12 cm</answer>", "12 cm"),
    ("<answer>12</answer>", "12 cm"),
    ("<answer>12\\text{ cm}</answer>", "12"),
    ("<answer>1,000</answer>", "1000"),
    ("<answer>3^{2}</answer>", "9"),
    ("<answer>\\sqrt{2}/2</answer>", "\\frac{\\sqrt{2}}{2}"),
    ("<think>7 * 1 = 7</think>\n<answer>7</answer>", "7"),
    ("<answer>5</answer> wait, no: <answer>7</answer>", "7"),  # the last tag counts
    ("so the total is \\boxed{\\frac{1}{2}}.", "0.5"),  # no tag: \boxed is the fallback
    ("first \\boxed{3}, then \\boxed{7}", "7"),
]

# wrong answers: parse fine, must earn 0.0
WRONG = [
    ("<answer>8</answer>", "7"),
    ("<answer>3</answer>", "-3"),
    ("<answer>9^{2}</answer>", "9"),
    ("<answer>0.333</answer>", "1/3"),
    ("<answer>7</answer>", "7.5"),
    ("<answer>3 cm</answer>", "12 cm"),
    ("<answer>\\frac{1}{3}</answer>", "0.5"),
    ("<answer>7</answer> wait, no: <answer>8</answer>", "7"),
    ("\\boxed{7} but actually \\boxed{8}", "7"),
]

# malformed output: 0.0 and no exception
MALFORMED = [
    ("The answer is 7.", "7"),  # no tag, no box
    ("", "7"),
    ("   \n", "7"),
    ("<answer></answer>", "7"),
    ("<answer>   </answer>", "7"),
    ("<answer>7", "7"),  # unclosed tag
    ("7</answer>", "7"),
    ("<answer>\\frac{1}{2</answer>", "0.5"),  # unbalanced braces
    ("<answer>7}</answer>", "7"),
    ("<answer>{{7</answer>", "7"),
    ("\\boxed{\\frac{1}{2}", "0.5"),  # unclosed box
    ("<answer>abc</answer>", "7"),
    ("<answer>\\text{seven}</answer>", "7"),
    ("<answer>$$$</answer>", "7"),
    ("<answer>\\\\\\</answer>", "7"),
    ("<answer>7</answer>", ""),  # empty gold
    ("<answer>" + "7+" * 20_000 + "7</answer>", "7"),  # very long garbage in the tag
    ("x{" * 30_000 + "\\boxed{" + "{" * 30_000, "7"),  # very long garbage, unclosed box
    ("".join(chr(33 + (i * 7919) % 94) for i in range(50_000)), "7"),  # very long printable noise
]


# numbers with units, in the answer, the gold answer or both: the unit is not part of the number
UNITS_RIGHT = [(pred, gold) for pred, gold in [
    ("5 dollars", "5"), ("5", "5 dollars"), ("10 m/s", "10"), ("60 km/h", "60"), ("12 cm^2", "12"), ("9 m^2", "9"),
    ("3 euros", "3"), ("250 grams", "250"), ("4 people", "4"), ("12 cookies", "12"), ("5 cm", "5"), ("5cm", "5"),
    ("\\$5", "5"), ("5%", "5"), ("90 degrees", "90"), ("90^\\circ", "90"), ("5\\text{ dollars}", "5"),
    ("\\frac{3}{4} cup", "\\frac{3}{4}"), ("3/4 cups", "0.75"), ("2.5 kg", "2.5"), ("1,000 dollars", "1000"),
    ("-4 degrees", "-4"), ("12 cm^2", "12 cm^2"), ("10 meters per second", "10"), ("7 hours", "7 h"),
    ("3 s", "3"), ("42 \\text{ km}^2", "42"), ("$5$ dollars", "5")]]
UNITS_WRONG = [
    ("5 dollars", "6"), ("6", "5 dollars"), ("50 dollars", "5"), ("2x", "2"), ("2 x", "2"), ("2 \\pi", "2"),
    ("3 apples and 2 pears", "3"), ("2 and 3", "2"), ("3^{2}", "3"), ("10 m/s", "1")]


@pytest.mark.parametrize("pred,gold", UNITS_RIGHT)
def test_numbers_with_units_score_one(pred, gold):
    assert math_reward(f"<answer>{pred}</answer>", gold) == 1.0


@pytest.mark.parametrize("pred,gold", UNITS_WRONG)
def test_units_never_make_a_wrong_number_right(pred, gold):
    assert math_reward(f"<answer>{pred}</answer>", gold) == 0.0


@pytest.mark.parametrize("completion,answer", CORRECT)
def test_equivalent_forms_score_one(completion, answer):
    assert math_reward(completion, answer) == 1.0


@pytest.mark.parametrize("completion,answer", WRONG)
def test_wrong_answers_score_zero(completion, answer):
    assert math_reward(completion, answer) == 0.0


@pytest.mark.parametrize("completion,answer", MALFORMED)
def test_malformed_outputs_score_zero(completion, answer):
    assert math_reward(completion, answer) == 0.0


@pytest.mark.parametrize("completion,expected", [
    ("<answer> 3/4 </answer>", "3/4"),
    ("<answer>1</answer><answer>2</answer>", "2"),
    ("<answer>x <answer>y</answer>", "y"),
    ("\\boxed{\\frac{1}{2}} and <answer>5</answer>", "5"),  # the tag beats \boxed
    ("so \\boxed{\\frac{\\sqrt{3}}{2}}.", "\\frac{\\sqrt{3}}{2}"),
    ("<answer></answer>", ""),
    ("<answer>7", None),
    ("\\boxed{7", None),
    ("no answer here", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("completion,expected", [
    ("<answer>7</answer>", 1.0),
    ("  <answer>7</answer>\n", 1.0),
    ("<think>7 * 1 = 7</think><answer>7</answer>", 1.0),
    ("<think>\nfirst\nsecond\n</think>\n\n<answer>\n7\n</answer>", 1.0),
    ("<answer>7</answer><answer>8</answer>", 0.0),  # two answer tags
    ("<think>a</think><answer>7</answer>\n<answer>7</answer>", 0.0),
    ("<answer>7</answer> so 7", 0.0),  # text after the answer
    ("The answer is <answer>7</answer>", 0.0),  # text before it
    ("<answer>7</answer><think>x</think>", 0.0),
    ("<think>a</think><think>b</think><answer>7</answer>", 0.0),
    ("<think>x <answer>1</answer></think><answer>7</answer>", 0.0),
    ("<answer>7", 0.0),  # missing close tag
    ("<think>a<answer>7</answer>", 0.0),  # unclosed think
    ("<think>a</think>", 0.0),
    ("7", 0.0),
    ("", 0.0),
])
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected
    assert REWARD_FUNCS["format"](completion, "7") == expected


def _cfg(**overrides) -> Config:
    return Config(**{"reward_workers": 2, **overrides})


def test_reward_functions_written_for_trl_run_unchanged_with_every_column(tmp_path):
    """TRL's signature (prompts, completions, completion_ids, **columns) is recognised and called on a batch as TRL
    calls it: chat prompts as message lists, completions as assistant message lists, every other column of the row
    by name (read from the data file, `level` here), async functions awaited. A None is 'does not apply': NaN in the
    raw values, left out of the weighted total; tgrpo's f(completion, answer) beside them is unchanged."""
    import json

    from transformers import AutoTokenizer

    from tgrpo.data import load_prompts
    from tgrpo.rollout.rewards import trl_style
    from tgrpo.tiny import ensure_tiny_model
    import reward_fixtures as fx

    assert trl_style(fx.trl_answer_in_completion) and trl_style(fx.trl_async_length)
    assert not trl_style(fx.contains_answer) and not trl_style(len)
    data = tmp_path / "rows.jsonl"
    rows = [{"messages": [{"role": "user", "content": "What is 3 + 4?"}], "answer": "7", "level": 1},
            {"messages": [{"role": "user", "content": "What is 30 + 40? Think it over and answer with care."}],
             "answer": "70", "level": 2}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _cfg(train_data=str(data), prompts_per_step=1,
               reward_funcs=["reward_fixtures:trl_answer_in_completion", "reward_fixtures:trl_async_length",
                             "reward_fixtures:trl_level_reward", "reward_fixtures:contains_answer"],
               reward_weights=[1.0, 1.0, 0.5, 2.0])
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model(os.path.join(ROOT, ".cache")))
    prompts, _ = load_prompts(cfg, tokenizer, keep_columns=True)
    assert prompts[0].prompt[-1] == rows[0]["messages"][0] and prompts[1].columns == {"answer": "70", "level": 2}
    assert load_prompts(cfg, tokenizer)[0][0].columns is None  # only kept when a TRL-style function needs them
    completions, ids = ["it is 7", "70!"], [[5, 6, 7], [8, 9]]
    with RewardScorer(cfg) as scorer:
        assert scorer.wants_rows
        rows_in = [Row(p.prompt, i, p.columns) for p, i in zip(prompts, ids)]
        totals, raw, _ = scorer.score([p.prompt_text for p in prompts], completions, ["7", "70"], rows=rows_in)
        # the same rows handed over group by group while generating
        submitted = [scorer.submit(completions[i:i + 1], [["7", "70"][i]], rows_in[i:i + 1]) for i in range(2)]
        assert scorer.score([p.prompt_text for p in prompts], completions, ["7", "70"], submitted=submitted)[0] == \
            totals
    assert raw["reward_fixtures:trl_answer_in_completion"][0] == 1.0
    assert math.isnan(raw["reward_fixtures:trl_answer_in_completion"][1])  # its prompt is over 40 characters: None
    assert raw["reward_fixtures:trl_async_length"] == [0.03, 0.02]
    assert raw["reward_fixtures:trl_level_reward"] == [1.0, 2.0]
    assert raw["reward_fixtures:contains_answer"] == [1.0, 1.0]
    assert totals == pytest.approx([1.0 + 0.03 + 0.5 + 2.0, 0.02 + 1.0 + 2.0])


def test_a_trl_style_function_returning_the_wrong_count_is_named():
    with RewardScorer(_cfg(reward_funcs=["reward_fixtures:trl_wrong_length"], reward_weights=[1.0])) as scorer:
        rows = [Row("p", [1], {"answer": "1"}), Row("p", [2], {"answer": "2"})]
        with pytest.raises(RewardError, match="trl_wrong_length' returned \\[1.0, 1.0\\] for 1 completions: it must "
                                              "return a list of one float"):
            scorer.score(["p", "p"], ["a", "b"], ["1", "2"], rows=rows)


def test_scorer_weights_and_raw_values():
    # math_reward runs on the scorer's pool threads, so through its worker interpreters
    completions = ["<answer>7</answer>", "<think>hm</think><answer>8</answer>", "it is 7", "<answer>0.5</answer>."]
    answers = ["7", "7", "7", "1/2"]
    with RewardScorer(_cfg(reward_funcs=["math", "format"], reward_weights=[1.0, 0.2])) as scorer:
        totals, raw, stats = scorer.score(["q"] * 4, completions, answers)
        assert raw == {"math": [1.0, 0.0, 0.0, 1.0], "format": [1.0, 1.0, 0.0, 0.0]}
        assert totals == pytest.approx([1.2, 0.2, 0.0, 1.0])
        assert stats["remote_failures"] == 0 and stats["reward_s"] > 0
        assert scorer.score([], [], [])[:2] == ([], {"math": [], "format": []})
        with pytest.raises(ValueError, match="2 prompts, 2 completions and 1 answers"):
            scorer.score(["q", "q"], ["<answer>7</answer>", "x"], ["7"])


@pytest.mark.parametrize("module", ["reward_fixtures", "tests.reward_fixtures"])
def test_scorer_user_function_with_builtin(module):
    names = ["format", f"{module}:length_reward", f"{module}:contains_answer"]
    completions = ["<answer>7</answer>", "7", "", "x" * 30]
    with RewardScorer(_cfg(reward_funcs=names, reward_weights=[1.0, 0.5, 2.0])) as scorer:
        totals, raw, _ = scorer.score([""] * 4, completions, ["7", "7", "7", "7"])
    assert list(raw) == names  # keyed by the names as configured, in their order
    assert raw[names[1]] == pytest.approx([1.0, 0.1, 0.0, 1.0])
    assert raw[names[2]] == [1.0, 1.0, 0.0, 0.0]
    assert totals == pytest.approx([3.5, 2.05, 0.0, 0.5])


def test_scorer_runs_slow_checks_side_by_side():
    # 8 checks of 0.5 s on 4 workers take about 1 s, not 4 s
    with RewardScorer(_cfg(reward_funcs=["reward_fixtures:slow_reward"], reward_weights=[1.0],
                           reward_workers=4)) as scorer:
        start = time.monotonic()
        totals, _, stats = scorer.score(["q"] * 8, ["c"] * 8, ["a"] * 8)
    assert totals == [1.0] * 8
    assert time.monotonic() - start < 2.5 and stats["reward_s"] < 2.5


def test_scorer_raising_user_function_names_it():
    name = "reward_fixtures:raising_reward"
    with RewardScorer(_cfg(reward_funcs=["format", name], reward_weights=[1.0, 1.0])) as scorer:
        with pytest.raises(RewardError, match=rf"reward function '{name}' raised ValueError: cannot score this "
                                              r"one on completion 'a boom'") as err:
            scorer.score(["q"] * 3, ["ok", "a boom", "ok"], ["7"] * 3)
        assert "\n" not in str(err.value) and isinstance(err.value.__cause__, ValueError)
        assert scorer.score(["q"], ["ok"], ["7"])[0] == [1.0]  # the scorer still works afterwards


def test_scorer_rejects_a_non_number():
    with RewardScorer(_cfg(reward_funcs=["reward_fixtures:text_reward"], reward_weights=[1.0])) as scorer:
        with pytest.raises(RewardError, match=r"'reward_fixtures:text_reward' returned '1.0' .*finite float"):
            scorer.score(["q"], ["c"], ["a"])


@pytest.mark.parametrize("overrides,message", [
    (dict(reward_funcs=["math", "accuracy"], reward_weights=[1, 1]),
     r"unknown reward 'accuracy' in reward_funcs: choose from \['math', 'format', 'em'\], 'remote'"),
    (dict(reward_funcs=["math", ":f"], reward_weights=[1, 1]), "unknown reward ':f'"),
    (dict(reward_funcs=["math", "format"], reward_weights=[1.0]),
     "reward_funcs has 2 names but reward_weights has 1 weights: give one weight per reward"),
    (dict(reward_funcs=[], reward_weights=[]), "reward_funcs is empty"),
    (dict(reward_funcs=["math", "math"], reward_weights=[1, 1]), "names a reward twice"),
    (dict(reward_funcs=["no_such_module_xyz:f"], reward_weights=[1]),
     r"reward 'no_such_module_xyz:f': cannot import module 'no_such_module_xyz' \(No module named "
     r"'no_such_module_xyz'\): put the folder that holds it on PYTHONPATH"),
    (dict(reward_funcs=["reward_fixtures:nope"], reward_weights=[1]),
     r"reward 'reward_fixtures:nope': module 'reward_fixtures' \(.*reward_fixtures.py\) has no 'nope'"),
    (dict(reward_funcs=["reward_fixtures:NOT_A_FUNCTION"], reward_weights=[1]),
     r"'NOT_A_FUNCTION' in module 'reward_fixtures' .* is a int, not a function"),
    (dict(reward_funcs=["remote"], reward_weights=[1]), "reward 'remote' needs reward_url"),
    (dict(reward_funcs=["remote"], reward_weights=[1], reward_url="localhost:8000/score"),
     r"reward_url 'localhost:8000/score' is not an http\(s\):// URL"),
    (dict(reward_funcs=["remote"], reward_weights=[1], reward_url="ftp://host/x"), "is not an http"),
    (dict(reward_workers=0), "reward_workers must be >= 1, got 0"),
    (dict(reward_max_concurrency=0), "reward_max_concurrency must be >= 1, got 0"),
    (dict(reward_batch_size=0), "reward_batch_size must be >= 1, got 0"),
    (dict(reward_retries=-1), "reward_retries must be >= 0, got -1"),
    (dict(reward_timeout_s=0), "reward_timeout_s must be > 0 seconds, got 0"),
    (dict(reward_on_failure="ignore"), "reward_on_failure must be 'fail' or 'zero'"),
])
def test_check_reward_config_rejects(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_reward_config(_cfg(**overrides))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=message):  # the scorer checks too, before it starts anything
        RewardScorer(_cfg(**overrides))


def test_check_reward_config_reports_a_broken_module(tmp_path, monkeypatch):
    (tmp_path / "broken_reward_mod.py").write_text("def f(c, a):\n    return (\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"importing module 'broken_reward_mod' raised SyntaxError") as err:
        check_reward_config(_cfg(reward_funcs=["broken_reward_mod:f"], reward_weights=[1]))
    assert "\n" not in str(err.value)


def test_check_reward_config_accepts_good_ones():
    check_reward_config(Config())  # the defaults
    check_reward_config(_cfg(reward_funcs=["remote", "math", "reward_fixtures:length_reward"],
                             reward_weights=[1, 1, 0.1], reward_url="https://rewards.example:8443/score"))


def test_math_reward_from_worker_threads():
    # off the main thread math-verify's SIGALRM timeouts cannot run; results must not change
    cases = CORRECT[:6] + WRONG[:3] + MALFORMED[:3]
    expected = [1.0] * 6 + [0.0] * 6
    with ThreadPoolExecutor(max_workers=2) as ex:
        got = list(ex.map(lambda ca: math_reward(*ca), cases))
    assert got == expected


@pytest.mark.parametrize("in_thread", [False, True])
def test_pathological_answer_times_out_instead_of_hanging(monkeypatch, in_thread):
    # without a timeout sympy spends minutes on this power tower
    monkeypatch.setattr(rewards, "TIMEOUT_S", 1)
    start = time.monotonic()
    if in_thread:
        with ThreadPoolExecutor(max_workers=1) as ex:
            got = ex.submit(math_reward, "<answer>9^{9^{9^{9}}}</answer>", "7").result()
    else:
        got = math_reward("<answer>9^{9^{9^{9}}}</answer>", "7")
    assert got == 0.0
    assert time.monotonic() - start < 20


def test_worker_thread_backstop_kills_stuck_subprocess(monkeypatch):
    # if math-verify's own timeout never fires, the subprocess is killed and the next call still works
    monkeypatch.setattr(rewards, "TIMEOUT_S", None)
    monkeypatch.setattr(rewards, "HARD_TIMEOUT_S", 2.0)
    with ThreadPoolExecutor(max_workers=1) as ex:
        start = time.monotonic()
        assert ex.submit(math_reward, "<answer>9^{9^{9^{9}}}</answer>", "7").result() == 0.0
        assert time.monotonic() - start < 10
        monkeypatch.setattr(rewards, "HARD_TIMEOUT_S", 30.0)
        assert ex.submit(math_reward, "<answer>0.5</answer>", "1/2").result() == 1.0


@pytest.mark.parametrize("completion, answer, expected", [
    ("<answer>Zerpen</answer>", "Zerpen", 1.0),
    ("<search>q</search> ... <answer> the zerpen. </answer>", "Zerpen", 1.0),  # case, article, punctuation
    ("<answer>Zerpen river</answer>", "Zerpen", 0.0),
    ("Zerpen", "Zerpen", 0.0),  # no answer block: nothing extracted
    ("<answer>wool</answer>", "silk|wool", 1.0),  # alternatives
    ("<answer></answer>", "", 0.0),
])
def test_exact_match_reward(completion, answer, expected):
    from tgrpo.rollout.rewards import em_reward

    assert em_reward(completion, answer) == expected
