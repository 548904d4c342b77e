"""Checkpoints verified by content: a file whose bytes changed but whose size did not (a torn or corrupted write) is
found by its hash, named, and skipped by --resume auto; a run with nothing usable says that it starts over."""
import json
import os

import pytest

from tgrpo.job import checkpoint
from tgrpo.config import Config, ConfigError


def _checkpoint(root, step: int) -> str:
    path = root / "checkpoints" / f"step-{step}"
    (path / "deepspeed").mkdir(parents=True)
    (path / "deepspeed" / "optim_states.pt").write_bytes(os.urandom(300_000))
    (path / "model.safetensors").write_bytes(os.urandom(100_000))
    checkpoint.write_manifest(str(path))
    (path / checkpoint.STATE).write_text(json.dumps({"step": step}))
    return str(path)


def _corrupt(path: str, offset: int = 100_000, size: int = 65536) -> None:
    """Overwrite bytes inside the file with others, keeping its size."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(size)
        f.seek(offset)
        f.write(bytes((b + 1) % 256 for b in old))


def test_same_size_other_bytes_are_found_and_named(tmp_path):
    path = _checkpoint(tmp_path, 10)
    assert checkpoint.damage(path) is None
    _corrupt(os.path.join(path, "deepspeed", "optim_states.pt"))
    assert checkpoint.damage(path) == ("deepspeed/optim_states.pt holds other bytes than were written (its xxh3-64 "
                                       "differs)")
    assert checkpoint.damage(path, content=False) is None  # its size is right: only the content shows it


def test_manifests_of_sizes_only_are_still_checked_by_size(tmp_path):
    path = _checkpoint(tmp_path, 10)
    (tmp_path / "checkpoints" / "step-10" / checkpoint.MANIFEST).write_text(
        json.dumps({"deepspeed/optim_states.pt": 300_000, "model.safetensors": 99}))
    assert checkpoint.damage(path) == "model.safetensors has 100000 bytes, 99 were written"


def test_resume_auto_skips_a_corrupted_newest_and_an_explicit_resume_stops(tmp_path, capfd):
    older, newer = _checkpoint(tmp_path, 10), _checkpoint(tmp_path, 20)
    _corrupt(os.path.join(newer, "model.safetensors"), offset=1000, size=10)
    cfg = Config(output_dir=str(tmp_path), resume="auto")
    assert checkpoint.resume_path(cfg) == older
    assert "step-20 is damaged (model.safetensors holds other bytes" in capfd.readouterr().err
    with pytest.raises(ConfigError, match=r"step-20' is damaged \(model.safetensors holds other bytes") as e:
        checkpoint.resume_path(Config(output_dir=str(tmp_path), resume=newer))
    assert "\n" not in str(e.value)


def test_resume_auto_with_every_checkpoint_damaged_says_it_starts_over(tmp_path, capfd):
    _corrupt(os.path.join(_checkpoint(tmp_path, 10), "deepspeed", "optim_states.pt"))
    assert checkpoint.resume_path(Config(output_dir=str(tmp_path), resume="auto")) is None
    err = capfd.readouterr().err
    assert "no complete, undamaged checkpoint in" in err and "starting over from step 0" in err
