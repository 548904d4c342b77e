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


# Written for TRL's GRPOTrainer, as its users write them (a batch, every dataset column by name, None where a reward
# does not apply): tgrpo runs them unchanged.
def trl_answer_in_completion(prompts, completions, answer, **kwargs):
    """1.0 if the reference answer is in the completion; None (does not apply) for prompts whose last turn is longer
    than 40 characters."""
    return [None if len(prompt[-1]["content"]) > 40 else float(ref in completion[0]["content"])
            for prompt, completion, ref in zip(prompts, completions, answer)]


async def trl_async_length(completions, completion_ids, **kwargs):
    return [len(ids) / 100 for ids in completion_ids]


def trl_level_reward(prompts, completions, level, **kwargs):
    """Uses a dataset column of its own ('level'), as TRL hands it over."""
    return [float(n) for n in level]


def trl_wrong_length(completions, **kwargs):
    return [1.0] * (len(completions) + 1)  # a bug: one score too many
