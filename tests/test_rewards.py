"""tgrpo.rewards on real answer strings: math-verify equivalence, malformed output, format, score(), threads."""
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tgrpo import rewards
from tgrpo.rewards import REWARD_FUNCS, extract_answer, format_reward, math_reward, score

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


def test_score_weights_and_raw_values():
    completions = ["<answer>7</answer>", "<think>hm</think><answer>8</answer>", "it is 7", "<answer>0.5</answer>."]
    answers = ["7", "7", "7", "1/2"]
    totals, raw = score(completions, answers, ["math", "format"], [1.0, 0.2])
    assert raw == {"math": [1.0, 0.0, 0.0, 1.0], "format": [1.0, 1.0, 0.0, 0.0]}
    assert totals == pytest.approx([1.2, 0.2, 0.0, 1.0])
    assert score([], [], ["math"], [1.0]) == ([], {"math": []})


def test_score_rejects_unknown_name_and_bad_lengths():
    with pytest.raises(ValueError, match=r"unknown reward 'accuracy'.*\['format', 'math'\]") as err:
        score(["<answer>7</answer>"], ["7"], ["math", "accuracy"], [1.0, 1.0])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="2 reward names but 1 weights"):
        score(["<answer>7</answer>"], ["7"], ["math", "format"], [1.0])
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        score(["<answer>7</answer>", "x"], ["7"], ["math"], [1.0])


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
