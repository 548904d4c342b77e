"""The NaN/inf guard: an update whose loss or gradient norm is NaN/inf is skipped (the weights bit-identical), at
every ZeRO stage, with the real DeepSpeed engine; a job whose weights hold NaN stops after max_nonfinite_in_a_row
steps in one line naming the step, exit status 1, no `done` line and no checkpoint of the NaN weights."""
import importlib
import json
import os
import shutil
import sys

import pytest
import torch
import torch.distributed as dist

from helpers import ROOT, free_port, run
from tgrpo.policy import deepspeed_engine
from tgrpo.config import Config
from tgrpo.tiny import ensure_tiny_model


@pytest.fixture(scope="module")
def world():
    """A gloo world of this one process, as a policy group of one rank sees it."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
            env.setenv(key, value)
        # DeepSpeed's shared-memory op reduces across the processes of a node: one process needs none (its build
        # takes minutes)
        env.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            yield ensure_tiny_model(os.path.join(ROOT, ".cache"))
        finally:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            # a ZeRO-3 config left alive would make every later from_pretrained of this process a ZeRO-3 load
            deepspeed_engine._hf_ds_configs.clear()
            unset_hf_deepspeed_config()
            dist.destroy_process_group()


def _engine(model_dir: str, stage: int):
    ds = deepspeed_engine.load_config(os.path.join(ROOT, "zero3.json"), Config(), zero_stage=stage, bf16=False,
                                      dp_size=1, hidden_size=128, trainable=True)
    return deepspeed_engine.build_engine(model_dir, ds, torch.float32, trainable=True, attention="sdpa", lr=1e-3)


def _weights(engine) -> list[torch.Tensor]:
    params = list(engine.module.parameters())
    with deepspeed_engine.gathered(params):
        return [p.data.clone() for p in params]


def _loss(engine, kind: str) -> torch.Tensor:
    """A micro-batch's loss: finite with finite gradients; finite whose gradients are NaN (the sqrt of a zero,
    d/dx sqrt(0 * x) = inf * 0); or NaN whose gradients are finite (the NaN does not reach the graph)."""
    ids = torch.tensor([[1, 5, 9, 14, 22, 31, 40, 57]])
    logp = engine(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
    loss = -logp[0, :-1].gather(-1, ids[0, 1:, None]).mean()
    if kind == "nan_gradient":
        return loss + torch.sqrt(loss * 0)
    if kind == "nan_loss":
        return loss + float("nan") * loss.detach()
    return loss


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_nan_gradient_or_loss_skips_the_update_and_leaves_the_weights_bit_identical(world, stage):
    """Stage 0 (our plain AdamW, which DeepSpeed steps unchecked: engine.step() wrote the NaN into every weight),
    ZeRO-2 and ZeRO-3: each bad micro-batch is skipped and counted, and the next finite one is applied."""
    engine = _engine(world, stage)
    before = _weights(engine)
    for kind in ("nan_gradient", "nan_loss"):
        loss = _loss(engine, kind)
        assert torch.isfinite(loss) == (kind == "nan_gradient")
        deepspeed_engine.backward(engine, loss)
        assert deepspeed_engine.step(engine) is False, kind
        after = _weights(engine)
        assert all(torch.equal(a, b) for a, b in zip(before, after)), kind
    assert engine.skipped_steps == 2
    deepspeed_engine.backward(engine, _loss(engine, "finite"))
    assert deepspeed_engine.step(engine) is True
    after = _weights(engine)
    assert all(torch.isfinite(w).all() for w in after)
    assert max((a - b).abs().max().item() for a, b in zip(before, after)) > 1e-5
    assert engine.skipped_steps == 2


def test_load_config_keeps_deepspeeds_own_bfloat16_check_on(tmp_path):
    """ZeRO-1/2 in bfloat16 skip a NaN gradient only with bf16.check_grad_overflow; a JSON that turns it off is
    overruled, since the guard relies on it."""
    ds = json.load(open(os.path.join(ROOT, "zero3.json")))
    ds["bf16"]["check_grad_overflow"] = False
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    for stage in (0, 1, 2, 3):
        loaded = deepspeed_engine.load_config(str(tmp_path / "ds.json"), Config(), zero_stage=stage, bf16=True,
                                              dp_size=2, hidden_size=128, trainable=True)
        assert loaded["bf16"] == {"enabled": True, "check_grad_overflow": True}


def test_weights_holding_nan_are_never_saved(world, tmp_path):
    """checkpoint.save counts the NaN/inf values of the weights as the HF model gathers them: none, it saves; some,
    every rank raises JobError naming how many and the newest checkpoint, and nothing of that step is left."""
    from types import SimpleNamespace

    from tgrpo.job import checkpoint
    from tgrpo.sync import weights as sync
    from tgrpo.errors import JobError

    engine = _engine(world, 0)
    job = SimpleNamespace(cfg=Config(output_dir=str(tmp_path)), rank=0, is_source=True,
                          groups=SimpleNamespace(data=dist.group.WORLD), critic=None, kl=SimpleNamespace(value=0.0),
                          placement=SimpleNamespace(sync_source=0, world_size=1, rollout=[], policy=[0],
                                                    reference=[], critic=[], colocated=False),
                          policy=SimpleNamespace(engine=engine, model=engine.module), model_dir=world,
                          plan=sync.model_plan(engine.module, 1 << 20), export_plan=None, reward_norms={})
    good = checkpoint.save(job, 1)
    assert checkpoint.find_latest(str(tmp_path)) == good
    with torch.no_grad():
        engine.module.model.norm.weight[:5] = float("nan")
        engine.module.lm_head.weight[0, :2] = float("inf")
    with pytest.raises(JobError, match=r"^step 2: the policy's weights hold 7 NaN/inf values, not saved: the run "
                                       r"stops; likely NaN/inf in the weights .* the newest checkpoint to go back "
                                       r"to: " + good + "$"):
        checkpoint.save(job, 2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-1"]


def test_a_nan_step_is_said_in_one_line_and_n_in_a_row_stop_the_run(tmp_path):
    """trainer._check_finite on the gathered metrics: a step with skipped updates is one line naming it, a clean
    step resets the count, the Nth in a row raises JobError naming the step, the count and where to go back."""
    from types import SimpleNamespace

    from tgrpo.job import checkpoint
    from tgrpo.errors import JobError
    from tgrpo.job.trainer import _check_finite

    lines = []
    job = SimpleNamespace(cfg=Config(output_dir=str(tmp_path), mini_batches=2), nonfinite_in_a_row=0,
                          log=SimpleNamespace(message=lines.append))
    _check_finite(job, 7, {"nonfinite_updates": 1.0})
    _check_finite(job, 8, {"nonfinite_updates": 2.0})
    assert lines == ["step 7: the loss or gradient norm was NaN/inf: 1 of 2 updates skipped (1 in a row; "
                     "max_nonfinite_in_a_row 3 stops the run)",
                     "step 8: the loss or gradient norm was NaN/inf: 2 of 2 updates skipped, the weights unchanged "
                     "(2 in a row; max_nonfinite_in_a_row 3 stops the run)"]
    _check_finite(job, 9, {"nonfinite_updates": 0.0})
    assert job.nonfinite_in_a_row == 0 and len(lines) == 2
    (tmp_path / "checkpoints" / "step-5").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-5" / checkpoint.STATE).write_text("{}")
    for step in (10, 11):
        _check_finite(job, step, {"nonfinite_updates": 2.0})
    with pytest.raises(JobError) as stop:
        _check_finite(job, 12, {"nonfinite_updates": 2.0})
    message = str(stop.value)
    assert message.startswith("step 12: the loss or gradient norm was NaN/inf: 2 of 2 updates skipped, the weights "
                              "unchanged; 3 steps in a row (max_nonfinite_in_a_row 3): the run stops, this step "
                              "unsaved; likely NaN/inf in the weights"), message
    assert "learning rate too high" in message and message.endswith(str(tmp_path / "checkpoints" / "step-5"))
    assert "\n" not in message
    ppo = SimpleNamespace(cfg=Config(output_dir=str(tmp_path), advantage_estimator="gae", max_nonfinite_in_a_row=1),
                          nonfinite_in_a_row=0, log=SimpleNamespace(message=lines.append))
    with pytest.raises(JobError, match=r"^step 2: the loss or gradient norm was NaN/inf: 1 of 1 critic updates "
                                       r"skipped; stopped at the first \(max_nonfinite_in_a_row 1\)"):
        _check_finite(ppo, 2, {"nonfinite_updates": 0.0, "critic/nonfinite_updates": 1.0})


@pytest.mark.slow
def test_a_model_holding_nan_stops_after_max_nonfinite_in_a_row_steps_unsaved(tmp_path):
    """The defect of issue 25: NaN in the weights (there from a damaged checkpoint) made every loss NaN, DeepSpeed
    skipped every update in silence, and the run saved the NaN weights and printed `done`. Now: one line for each of
    the first two steps, the third stops the run (exit status 1) in one line naming the step; no `done`, no
    checkpoint."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(ensure_tiny_model(os.path.join(ROOT, ".cache")), model)
    weights = load_file(str(model / "model.safetensors"))
    weights["model.norm.weight"][:] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    result = run(["bash", "launch/node.sh", "0", "127.0.0.1", "--", "--model", str(model),
                  "--rollout_ranks", "0-0", "--policy_ranks", "1-1", "--max_steps", "4", "--prompts_per_step", "4",
                  "--num_generations", "4", "--micro_batch_size", "16", "--dist_timeout_s", "120",
                  "--output_dir", str(out)], timeout=600,
                 env={"PYTHON": sys.executable, "MASTER_PORT": str(free_port()), "HOSTFILE": str(tmp_path / "hostfile")})
    said = result.stdout + result.stderr
    assert result.returncode == 1, said[-4000:]
    ours = [line.strip() for line in result.stdout.splitlines() if "NaN/inf" in line]  # the job's lines
    assert [line[:line.index(":")] for line in ours] == ["step 1", "step 2", "error"], said[-4000:]
    assert ours[2].startswith("error: step 3: the loss or gradient norm was NaN/inf: 1 of 1 updates skipped, the "
                              "weights unchanged; 3 steps in a row (max_nonfinite_in_a_row 3): the run stops"), ours
    assert "no checkpoint to go back to" in ours[2]
    # node.sh's last word names that stop, not a rank that torchrun then stopped (it read 'rank 1 (local rank 1 on
    # localhost) exited with status 143')
    assert result.stderr.strip().splitlines()[-1] == f"{ours[2]} (log: {out}/logs/node0.log)", result.stderr
    assert "done" not in said
    checkpoints = out / "checkpoints"
    assert not checkpoints.exists() or not os.listdir(checkpoints)
