"""Config parsing, placement validation and bucket planning: pure, fast, no process groups."""
import dataclasses
import math

import pytest
import torch

from helpers import check
from tgrpo.config import Config, ConfigError, build_parser, load_config
from tgrpo.job.placement import Placement, parse_ranges
from tgrpo.sync.weights import plan_buckets


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 3.0e-4\nmax_steps: 7\nreward_funcs: [math]\nreward_weights: [1.0]\n")
    cfg = load_config(["--config", str(path), "--max_steps", "9", "--sync_check", "true"])
    assert cfg.learning_rate == 3e-4 and cfg.max_steps == 9 and cfg.sync_check is True
    assert cfg.reward_funcs == ["math"] and cfg.reward_weights == [1.0]


def test_help_lists_every_field_with_text():
    text = build_parser().format_help()
    for f in dataclasses.fields(Config):
        assert f"--{f.name}" in text and f.metadata["help"]


@pytest.mark.parametrize("argv, words", [
    (["--max_steps", "many"], "invalid int value"),
    (["--loss_type", "ppo"], "invalid choice"),
    (["--unknown_flag", "1"], "unrecognized arguments"),
    (["--learning_rat", "1e-5"], "unrecognized arguments: --learning_rat"),  # no abbreviations
])
def test_bad_flags_raise_one_line(argv, words):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_bad_yaml_keys_and_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rte: 1.0\n")
    with pytest.raises(ConfigError, match="unknown field 'learning_rte'"):
        load_config(["--config", str(path)])
    path.write_text("max_steps: ten\n")
    with pytest.raises(ConfigError, match="field 'max_steps'"):
        load_config(["--config", str(path)])


def test_parse_ranges():
    assert parse_ranges("0-2", "x") == [0, 1, 2]
    assert parse_ranges("0,2-3", "x") == [0, 2, 3]
    for bad in ("a-b", "3-1", "0-1,1"):
        with pytest.raises(ConfigError):
            parse_ranges(bad, "x")


@pytest.mark.parametrize("rollout, policy, world, words", [
    ("0-1", "1-2", 3, "in both"),
    ("0-0", "1-1", 3, "have no role"),
    ("0-0", "1-3", 3, "beyond the world size"),
    ("0-0", "x", 3, "not a rank range"),
])
def test_bad_placement(rollout, policy, world, words):
    cfg = Config(rollout_ranks=rollout, policy_ranks=policy)
    with pytest.raises(ConfigError, match=words):
        Placement.from_config(cfg, world)


def test_placement_roles_and_sync_group():
    p = Placement.from_config(Config(rollout_ranks="2-3", policy_ranks="0-1"), 4)
    assert p.roles(0) == {"policy"} and p.roles(3) == {"rollout"}
    assert p.sync_source == 0 and p.sync_sets() == [(0, 2, 3)]


def test_several_senders_split_the_engines_between_them():
    cfg = Config(rollout_ranks="0-3", policy_ranks="4-5", sync_senders=2)
    p = Placement.from_config(cfg, 6)
    assert p.sync_sets() == [(4, 0, 2), (5, 1, 3)]
    # never more senders than policy ranks or engines
    p = Placement.from_config(Config(rollout_ranks="0-0", policy_ranks="1-2", sync_senders=4), 3)
    assert p.sync_sets() == [(1, 0)]


def test_tensor_parallel_engines_and_reference_ranks():
    cfg = Config(rollout_ranks="0-3", policy_ranks="4-5", reference_ranks="6-7", beta=0.1,
                 rollout_tensor_parallel_size=2)
    p = Placement.from_config(cfg, 8, local_world_size=8)
    assert p.engine_ranks == (0, 2) and p.sync_sets() == [(4, 0, 2)] and p.roles(7) == {"reference"}


def test_colocated_gives_every_rank_both_roles():
    p = Placement.from_config(Config(rollout_ranks="all", policy_ranks="all", colocate=True), 2)
    assert p.roles(1) == {"rollout", "policy"} and p.engine_ranks == (0, 1)
    with pytest.raises(ConfigError, match="set both to 'all'"):
        Placement.from_config(Config(rollout_ranks="0-0", policy_ranks="all", colocate=True), 2)


@pytest.mark.parametrize("kwargs, world, local, words", [
    (dict(rollout_ranks="0-2", policy_ranks="3-3", rollout_tensor_parallel_size=2), 4, 4, "do not split"),
    (dict(rollout_ranks="1-2", policy_ranks="0,3", rollout_tensor_parallel_size=2), 4, 2, "crosses a node"),
    (dict(rollout_ranks="0-0", policy_ranks="1-1", reference_ranks="1-1", beta=0.1), 2, 2, "another role"),
    (dict(rollout_ranks="0-0", policy_ranks="1-1", reference_ranks="2-2"), 3, 3, "beta=0 loads no reference"),
])
def test_bad_engine_and_reference_placement(kwargs, world, local, words):
    with pytest.raises(ConfigError, match=words):
        Placement.from_config(Config(**kwargs), world, local)


def test_validate_checks_batch_divisibility_and_model_path():
    with pytest.raises(ConfigError, match="divisible by policy ranks"):
        check(Config(prompts_per_step=3, num_generations=2, micro_batch_size=4, max_tokens_per_micro_batch=0), 3)
    with pytest.raises(ConfigError, match="equal mini-batches of at least one sample per policy rank"):
        check(Config(prompts_per_step=3, num_generations=2, mini_batches=4), 3)
    check(Config(prompts_per_step=3, num_generations=2), 3)  # a token budget packs any batch size
    with pytest.raises(ConfigError, match="not a model folder"):
        check(Config(model="/no/such/model"), 3)
    with pytest.raises(ConfigError, match="unknown reward"):
        check(Config(reward_funcs=["math", "nope"], reward_weights=[1, 1]), 3)


def test_zero_stage_and_sync_mode():
    assert check(Config(zero_stage=2), 3).sync_mode == "gather"  # auto: partitions sends ZeRO-3 shards
    assert check(Config(), 3).sync_mode == "partitions"
    with pytest.raises(ConfigError, match="sync_mode partitions sends ZeRO-3 shards"):
        check(Config(zero_stage=2, sync_mode="partitions"), 3)
    with pytest.raises(ConfigError, match="zero_stage must be auto, 0, 1, 2 or 3"):
        check(Config(zero_stage=4), 3)


@pytest.mark.parametrize("placement, stage, mode", [
    (dict(policy_ranks="1-2"), 3, "partitions"),  # the default: sharded over two policy ranks
    (dict(policy_ranks="1-1", rollout_ranks="0-0"), 2, "gather"),  # one rank holds it whole: ZeRO-2 is fastest
    (dict(policy_ranks="1-1", rollout_ranks="0-0", sync_mode="partitions"), 3, "partitions"),  # shards asked for
    (dict(colocate=True, rollout_ranks="all", policy_ranks="all"), 2, "gather"),  # one colocated GPU
])
def test_zero_stage_auto_picks_the_fastest_correct_stage(placement, stage, mode):
    world = 1 if placement.get("colocate") else 2 if placement["policy_ranks"] == "1-1" else 3
    chosen = Placement.from_config(Config(**placement), world)
    assert (chosen.zero_stage, chosen.zero_stage_auto, chosen.sync_mode) == (stage, True, mode)
    explicit = Placement.from_config(Config(**{**placement, "zero_stage": 1, "sync_mode": "gather"}), world)
    assert (explicit.zero_stage, explicit.zero_stage_auto) == (1, False)  # an explicit stage wins


def test_zero_stage_parses_auto_and_numbers(tmp_path):
    assert load_config([]).zero_stage == "auto"
    assert load_config(["--zero_stage", "2"]).zero_stage == 2
    path = tmp_path / "c.yaml"
    path.write_text("zero_stage: 0\n")
    assert load_config(["--config", str(path)]).zero_stage == 0
    path.write_text("zero_stage: auto\n")
    assert load_config(["--config", str(path)]).zero_stage == "auto"
    with pytest.raises(ConfigError, match="invalid choice"):
        load_config(["--zero_stage", "4"])


def test_tis_cap_with_nucleus_sampling_stops_in_one_line():
    """vLLM's logprobs under top_p < 1 are renormalised over the nucleus: importance weights against the trainer's
    full-vocabulary logprobs would be biased, so the pair is refused (and max_staleness, which needs tis_cap)."""
    check(Config(top_p=0.9), 3)
    check(Config(tis_cap=2.0), 3)
    with pytest.raises(ConfigError, match="with top_p=0.9 vLLM's logprobs are renormalised over the nucleus"):
        check(Config(top_p=0.9, tis_cap=2.0), 3)
    bad = load_config(["--config", "configs/default.yaml", "--top_p", "0.95", "--tis_cap", "2"])
    with pytest.raises(ConfigError) as e:
        check(bad, 3)
    assert "\n" not in str(e.value) and "set top_p 1.0 or tis_cap 0" in str(e.value)


@pytest.mark.parametrize("kind, warmup, expected", [
    ("constant", {}, [1.0] * 10),
    ("constant", {"warmup_steps": 2}, [0.0, 0.25, 0.5, 0.75] + [1.0] * 6),
    ("linear", {"warmup_ratio": 0.2}, [0.0, 0.5] + [(10 - k) / 8 for k in range(2, 10)]),  # 1 step of 5: 2 updates
    ("cosine", {"warmup_steps": 1}, [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]),
])
def test_learning_rate_schedules(kind, warmup, expected):
    """TRL's names over the run's optimizer steps: 5 steps x 2 mini-batches here, warmup counted in steps."""
    from tgrpo.policy.worker import lr_schedule

    cfg = Config(lr_scheduler_type=kind, max_steps=5, mini_batches=2, learning_rate=1.0, **warmup)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule, seen = lr_schedule(optimizer, cfg), []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ConfigError, match="warmup_steps must be in 0..max_steps=5"):
        check(Config(lr_scheduler_type=kind, max_steps=5, warmup_steps=6), 3)


def test_plan_buckets_packs_in_order_and_splits_by_size_and_dtype():
    f32, bf16 = torch.float32, torch.bfloat16
    params = [("a", [4, 4], f32), ("b", [8], f32), ("c", [100], f32), ("d", [2], f32), ("e", [3], bf16)]
    plan = plan_buckets(params, bucket_bytes=100)  # 25 float32 values
    assert [[n for n, *_ in b.params] for b in plan] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan[0].params[1] == ("b", [8], 16, 8) and plan[0].numel == 24
    assert [b.dtype for b in plan] == ["float32", "float32", "float32", "bfloat16"]


def test_help_lists_every_field():
    from tgrpo.config import build_parser

    text = build_parser().format_help()  # argparse %-formats each help string: a stray % breaks --help
    for f in dataclasses.fields(Config):
        assert f"--{f.name}" in text


def test_critic_placement_and_options():
    """advantage_estimator gae: the critic on ranks of its own (one role each; never in a sync group, which holds
    the policy and engine ranks only) or on the policy ranks; its options need the estimator."""
    placement = Placement.from_config(Config(advantage_estimator="gae", rollout_ranks="0-0", policy_ranks="1-1",
                                             critic_ranks="2-2"), 3)
    assert placement.critic == (2,) and placement.role_name(2) == "critic"
    assert all(2 not in ranks for ranks in placement.sync_sets())
    assert Placement.from_config(Config(advantage_estimator="gae"), 3).critic == ()
    with pytest.raises(ConfigError, match="critic_ranks='1-1' and in another role"):
        Placement.from_config(Config(advantage_estimator="gae", rollout_ranks="0-0", policy_ranks="1-1",
                                     critic_ranks="1-1"), 2)
    with pytest.raises(ConfigError, match="have no role: cover every rank with rollout_ranks, policy_ranks, "
                                          "reference_ranks, critic_ranks, reward_ranks and judge_ranks"):
        Placement.from_config(Config(advantage_estimator="gae", rollout_ranks="0-0", policy_ranks="1-1"), 3)
    with pytest.raises(ConfigError, match="for the critic of advantage_estimator gae"):
        Config(critic_ranks="2-2").check()
    with pytest.raises(ConfigError, match="num_generations must be >= 2 with advantage_estimator grpo"):
        Config(num_generations=1).check()
    Config(advantage_estimator="gae", num_generations=1).check()
    with pytest.raises(ConfigError, match="set kl_in_reward true and beta > 0"):
        Config(kl_ctrl="adaptive").check()
    with pytest.raises(ConfigError, match="set dynamic_sampling false"):
        Config(advantage_estimator="gae", dynamic_sampling=True).check()
    with pytest.raises(ConfigError, match="report_to must name tensorboard and/or wandb"):
        Config(report_to=["tensorboard", "none"]).check()
