"""Which checkpoint a resume picks: never one cut off mid-write."""
import json
import os

import pytest

from tgrpo.job import checkpoint
from helpers import check
from tgrpo.config import Config, ConfigError
from tgrpo.job.placement import Placement


def _make(root, name, complete=True, step=None):
    path = root / "checkpoints" / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x")
    if complete:
        (path / checkpoint.STATE).write_text(json.dumps({"step": step or int(name.split("-")[1].split(".")[0])}))
    return path


def test_latest_marker_names_the_newest_complete_checkpoint(tmp_path):
    _make(tmp_path, "step-10")
    _make(tmp_path, "step-20")
    (tmp_path / "checkpoints" / "latest").write_text("step-20\n")
    assert checkpoint.find_latest(str(tmp_path)).endswith("step-20")


def test_a_checkpoint_cut_off_mid_write_is_never_chosen(tmp_path):
    _make(tmp_path, "step-10")
    _make(tmp_path, "step-20.tmp")  # the rename never happened
    _make(tmp_path, "step-30", complete=False)  # no trainer_state.json: not a finished folder
    (tmp_path / "checkpoints" / "latest").write_text("step-30\n")  # a marker naming an incomplete folder
    assert checkpoint.find_latest(str(tmp_path)).endswith("step-10")


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert checkpoint.find_latest(str(tmp_path)) is None
    _make(tmp_path, "step-5.tmp")
    assert checkpoint.find_latest(str(tmp_path)) is None
    assert checkpoint.resume_path(Config(output_dir=str(tmp_path), resume="auto")) is None


def test_only_the_newest_are_kept(tmp_path):
    for step in (10, 20, 30, 40):
        _make(tmp_path, f"step-{step}")
    checkpoint._prune(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-30", "step-40"]


def test_resume_from_a_folder_that_is_not_a_checkpoint_is_one_clear_error(tmp_path):
    _make(tmp_path, "step-7", complete=False)
    with pytest.raises(ConfigError, match="not a complete checkpoint folder"):
        check(Config(resume=str(tmp_path / "checkpoints" / "step-7")), 3)


def test_resume_with_another_placement_names_the_difference(tmp_path):
    path = _make(tmp_path, "step-10")
    state = {"step": 10, "world_size": 3, "rollout": [0], "policy": [1, 2], "reference": [], "colocated": False}
    (path / checkpoint.STATE).write_text(json.dumps(state))
    checkpoint.check_resumable(str(path), Placement.from_config(Config(), 3))
    other = Placement.from_config(Config(rollout_ranks="0-1", policy_ranks="2-3"), 4)
    with pytest.raises(ValueError, match="world_size=3"):
        checkpoint.check_resumable(str(path), other)


def test_every_rank_refuses_a_checkpoint_this_run_cannot_continue_before_anything_starts(tmp_path):
    """The checks (node.sh's pre-flight and every rank's) read the checkpoint a run would resume, by its
    trainer_state.json alone: a use_lora change or another placement is one ConfigError before any engine starts.
    With 'auto' that is the newest checkpoint whose files have the sizes its manifest lists; one whose state file
    does not parse is left to resume's own checks."""
    state = {"step": 10, "world_size": 3, "rollout": [0], "policy": [1, 2], "reference": [], "colocated": False,
             "use_lora": True}
    older, newer = _make(tmp_path, "step-10"), _make(tmp_path, "step-20")
    (older / checkpoint.STATE).write_text(json.dumps(state))
    (newer / checkpoint.STATE).write_text(json.dumps({**state, "step": 20}))
    with pytest.raises(ConfigError, match="step-20 was written by a run training a LoRA adapter .use_lora true.: "
                                          "resume it with use_lora true"):
        check(Config(output_dir=str(tmp_path), resume="auto"), 3)
    with pytest.raises(ConfigError, match="step-10 was written with world_size=3, this run has 4"):
        check(Config(resume=str(older), use_lora=True, rollout_ranks="0-1", policy_ranks="2-3"), 4)
    check(Config(output_dir=str(tmp_path), resume="auto", use_lora=True), 3)
    (newer / checkpoint.STATE).write_text('{"step": 2')  # a state file that does not parse: not refused here
    check(Config(output_dir=str(tmp_path), resume="auto"), 3)


def test_a_fresh_run_never_writes_over_a_previous_one(tmp_path):
    """A run into an output_dir holding metrics or checkpoints stops in one line, unless it resumes (a restart
    before any checkpoint included) or is told to start over, which clears the previous run's outputs."""
    fresh = Config(output_dir=str(tmp_path))
    checkpoint.check_output_dir(fresh)  # empty: fine
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "logs").mkdir()
    with pytest.raises(ConfigError, match="holds a previous run .metrics.jsonl.: continue it with --resume auto"):
        checkpoint.check_output_dir(fresh)
    checkpoint.check_output_dir(Config(output_dir=str(tmp_path), resume="auto"))
    over = Config(output_dir=str(tmp_path), overwrite_output_dir=True)
    checkpoint.check_output_dir(over)
    _make(tmp_path, "step-10")
    (tmp_path / "tensorboard").mkdir()
    checkpoint.clear_previous_run(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["logs"]
    checkpoint.check_output_dir(fresh)
    _make(tmp_path, "step-3")
    with pytest.raises(ConfigError, match=r"holds a previous run \(checkpoints/\)"):
        checkpoint.check_output_dir(fresh)
    with pytest.raises(ConfigError, match="contradict each other"):
        check(Config(resume="auto", overwrite_output_dir=True), 3)


def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="output_dir '.*a-file/out' cannot be written"):
        checkpoint.check_output_dir(Config(output_dir=str(tmp_path / "a-file" / "out")))


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_naming_the_file(tmp_path, capfd):
    """Sizes written at save are checked at resume: a truncated DeepSpeed shard or missing model weights make
    --resume auto take the previous checkpoint and say which file; an explicit --resume of it is one error."""
    older, newer = _make(tmp_path, "step-10"), _make(tmp_path, "step-20")
    for path in (older, newer):
        (path / "deepspeed").mkdir()
        (path / "deepspeed" / "shard.pt").write_bytes(b"0123456789")
        checkpoint.write_manifest(str(path))
    assert checkpoint.find_latest(str(tmp_path)).endswith("step-20")
    (newer / "deepspeed" / "shard.pt").write_bytes(b"01234")  # cut off
    assert checkpoint.find_latest(str(tmp_path)).endswith("step-10")
    assert "deepspeed/shard.pt has 5 bytes, 10 were written" in capfd.readouterr().err
    (older / "model.safetensors").unlink()
    assert checkpoint.find_latest(str(tmp_path)) is None
    assert "model.safetensors is missing" in capfd.readouterr().err
    with pytest.raises(ConfigError, match="step-20' is damaged .deepspeed/shard.pt has 5 bytes"):
        check(Config(resume=str(newer)), 3)
