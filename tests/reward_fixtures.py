"""Example user rewards for tests, named in reward_funcs as 'reward_fixtures:<function>' (tests/ is on sys.path)."""
import time

NOT_A_FUNCTION = 3


def length_reward(completion: str, answer: str) -> float:
    """Longer completions earn more, up to 1.0 at 10 characters."""
    return min(len(completion) / 10, 1.0)


def contains_answer(completion: str, answer: str) -> float:
    return float(answer in completion)


def slow_reward(completion: str, answer: str) -> float:
    """A check that takes a while, as a sandboxed test run or a judge call would."""
    time.sleep(0.5)
    return 1.0


def raising_reward(completion: str, answer: str) -> float:
    if "boom" in completion:
        raise ValueError("cannot score this one")
    return 1.0


def text_reward(completion: str, answer: str) -> str:
    return "1.0"  # a bug: a string, not a float
