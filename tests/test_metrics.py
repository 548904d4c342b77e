"""Rank 0's record of a run (tgrpo.job.metrics): what it says on the console beside metrics.jsonl."""
import json
from types import SimpleNamespace

from tgrpo.config import Config
from tgrpo.job.metrics import FLAT_STEPS, Metrics


def _samples(rewards: list[float]) -> list:
    return [SimpleNamespace(reward=r, prompt_text="p", completion_text="c", answer="a", reward_parts={},
                            advantage=0.0, truncated=False, completion_mask=None, versions=None) for r in rewards]


def test_steps_whose_every_group_got_one_reward_are_said_once_naming_them(tmp_path, capsys):
    """A run whose reward collapsed to a constant (every group flat: zero advantages, loss and gradient) ended
    `done` without a word. Now FLAT_STEPS such steps in a row are named once; a step with one varied group (one
    group of two flat ones is enough to learn from) is not flat and restarts the count."""
    log = Metrics(Config(output_dir=str(tmp_path), num_generations=2, report_to=[]), enabled=True)
    flat, varied = [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]
    for step, rewards in enumerate([varied, flat, flat, varied, flat, flat, flat, flat, flat], 1):
        log.log(step, _samples(rewards), {"reward/mean": sum(rewards) / len(rewards), "time/step_s": 1.0})
    log.close()
    said = [line for line in capsys.readouterr().out.replace("\r", "\n").splitlines() if "same reward" in line]
    assert FLAT_STEPS == 3 and len(said) == 1, said
    assert said[0].startswith("warning: steps 5-7: every group's completions got the same reward (mean 0.500): the "
                              "reward gives no signal to learn from"), said
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == list(range(1, 10))
