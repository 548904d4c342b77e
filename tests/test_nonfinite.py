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
from tgrpo import deepspeed_engine
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
