"""Bad input: one clear line naming the problem and the fix, exit status 2, before any engine starts."""
import json
import os
import shutil
import sys

import pytest

from helpers import ROOT, free_port, run, torchrun


def _rows(tmp_path, rows) -> str:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    return str(path)


GOOD = {"messages": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"}

# A model folder or a data file with one thing wrong (issue 25, point 5) -> the words of its line, under both launchers
BAD_FILES = {
    "no-tokenizer": "has no tokenizer (no tokenizer.json",
    "no-chat-template": "has a tokenizer without a chat template",
    "no-weights": "has no weights (no *.safetensors",
    "missing-shard": "is missing 1 of the 2 weight files its model.safetensors.index.json names",
    "cut-weights": "has a damaged weight file model.safetensors",
    "critic-no-weights": "/critic' has no weights",
    "answer-object": "train_data row 20: 'answer' holds a JSON object",
    "malformed-jsonl": "bad.jsonl' could not be read (line 22 is not JSON: it ends mid-row",
}


def _bad_file(tmp_path, case: str) -> list[str]:
    """The arguments that name BAD_FILES[case]: the embedded tiny model copied with a file missing or cut short,
    or data rows."""
    if case == "answer-object":
        return ["--train_data", _rows(tmp_path, [GOOD] * 20 + [{"messages": GOOD["messages"], "answer": {"value": 2}}])]
    if case == "malformed-jsonl":  # a blank line (skipped), then a row cut off mid-write
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join([json.dumps(GOOD)] * 20 + ["", json.dumps(GOOD)[:30], json.dumps(GOOD)]) + "\n")
        return ["--train_data", str(path)]
    from tgrpo.tiny import ensure_tiny_model

    tiny = ensure_tiny_model(os.path.join(ROOT, ".cache"))
    model = tmp_path / ("critic" if case.startswith("critic") else "model")
    dropped = {"no-tokenizer": ["tokenizer.json", "tokenizer_config.json"], "no-chat-template": ["chat_template.jinja"],
               "no-weights": ["*.safetensors"], "missing-shard": ["*.safetensors"],
               "critic-no-weights": ["*.safetensors"]}.get(case, [])
    shutil.copytree(tiny, model, ignore=shutil.ignore_patterns(*dropped))
    if case == "missing-shard":  # an index naming two shards, one of them there
        shutil.copy(os.path.join(tiny, "model.safetensors"), model / "model-00001-of-00002.safetensors")
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    elif case == "cut-weights":  # a download cut short
        os.truncate(model / "model.safetensors", os.path.getsize(model / "model.safetensors") // 2)
    elif case == "critic-no-weights":
        return ["--advantage_estimator", "gae", "--critic_model", str(model)]
    return ["--model", str(model)]


@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (["--rollout_ranks", "0-1", "--policy_ranks", "1-2"], "in both rollout_ranks"),
    (["--rollout_ranks", "0-0", "--policy_ranks", "1-1"], "have no role"),
    (["--rollout_ranks", "0-0", "--policy_ranks", "1-3"], "beyond the world size 3"),
    (["--model", "/no/such/model"], "is not a model folder"),
    (["--learning_rate", "fast"], "invalid float value"),
    ("no-answer", "no answer in 'answer'"),
    ("file-as-output-dir", "cannot be written"),
    ("corrupt-model", "cannot be loaded"),
    ("previous-run", "holds a previous run (metrics.jsonl): continue it with --resume auto"),
    ("no-prompt", "holds no prompt"),
    ("empty-data", "bad.json' is empty (no rows)"),
    ("remote-reward-down", "check reward_url and reward_timeout_s, or set reward_on_failure=zero"),
    *BAD_FILES.items(),
])
def test_node_sh_rejects_bad_input_in_one_line(tmp_path, args, words):
    if isinstance(args, str) and args in BAD_FILES:
        args = _bad_file(tmp_path, args)
    elif args == "corrupt-model":
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "qwen2", "hidden_size": ')  # cut off mid-write
        args = ["--model", str(model)]
    elif args == "file-as-output-dir":
        (tmp_path / "f").write_text("")
        args = ["--output_dir", str(tmp_path / "f" / "out")]
    elif args == "previous-run":
        (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
        args = ["--output_dir", str(tmp_path)]
    elif args == "no-answer":
        args = ["--train_data", _rows(tmp_path, [GOOD] * 20 + [{"messages": GOOD["messages"], "answer": ""}])]
    elif args == "no-prompt":
        args = ["--train_data", _rows(tmp_path, [GOOD] * 20 + [{"messages": [], "answer": "3"}])]
    elif args == "empty-data":  # datasets said only 'StopIteration'
        (tmp_path / "bad.json").write_text("")
        args = ["--train_data", str(tmp_path / "bad.json")]
    elif args == "remote-reward-down":  # nothing listens there: found by the pre-flight, not after the engines start
        args = ["--reward_funcs", "remote", "--reward_weights", "1", "--reward_retries", "0",
                "--reward_url", f"http://127.0.0.1:{free_port()}/score"]
    # the run's own output_dir (a case may name another: the last one counts), never the repo's output/, which may
    # hold a run; and a port of its own, never node.sh's default, should a case get past the pre-flight
    result = run(["bash", "launch/node.sh", "0", "127.0.0.1", "--", "--output_dir", str(tmp_path / "out"), *args],
                 timeout=600, env={"PYTHON": sys.executable, "MASTER_PORT": str(free_port())})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert "EngineCore" not in result.stdout + result.stderr  # nothing started


def test_jsonl_blank_lines_are_skipped_and_answers_are_strings_or_numbers(tmp_path):
    """Blank lines of JSON lines are skipped, as datasets skips them, and rows are counted without them. Answers are
    strings or numbers, mixed in one column too (datasets reads it as JSON values); a list is refused, as an object."""
    from transformers import AutoTokenizer

    from tgrpo.config import Config
    from tgrpo.data import load_prompts
    from tgrpo.errors import ConfigError
    from tgrpo.tiny import ensure_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model(os.path.join(ROOT, ".cache")))
    path = tmp_path / "rows.jsonl"
    cfg = Config(train_data=str(path), prompts_per_step=1)
    path.write_text(json.dumps(GOOD) + "\n\n  \n" + json.dumps({**GOOD, "answer": ""}) + "\n\n")
    with pytest.raises(ConfigError, match="^train_data row 1: no answer"):
        load_prompts(cfg, tokenizer)
    rows = [json.dumps({**GOOD, "answer": answer}) for answer in ("2", 3, 2.5, 4.0, ["2", "two"])]
    path.write_text("\n".join(rows[:4]) + "\n")
    assert [p.answer for p in load_prompts(cfg, tokenizer)[0]] == ["2", "3", "2.5", "4"]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ConfigError) as e:
        load_prompts(cfg, tokenizer)
    assert str(e.value).startswith("""train_data row 4: 'answer' holds a list (["2", "two"]), not an answer"""), e.value


def test_bad_hostfile_and_node_rank(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=2\nnode-b gpus=2\n")
    result = run(["bash", "launch/node.sh", "0", "127.0.0.1"], timeout=30, env={"HOSTFILE": str(hostfile)})
    assert result.returncode == 2 and "host slots=N" in result.stderr
    result = run(["bash", "launch/node.sh", "3", "127.0.0.1"], timeout=30)
    assert result.returncode == 2 and "NODE_RANK '3'" in result.stderr
    hostfile.write_text("node-a slots=2\nnode-b slots=0\n")  # it read 'ranks [0, 1, 2] are beyond the world size'
    result = run(["bash", "launch/node.sh", "0", "127.0.0.1"], timeout=30, env={"HOSTFILE": str(hostfile)})
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: {hostfile}: node 1 has slots=0: every node runs at least one process (slots = its GPUs, or its "
        "processes on a CPU machine); remove the line of a node that takes no part"), result.stderr


@pytest.mark.slow
def test_torchrun_bad_row_found_by_rollout_rank_ends_every_rank(tmp_path):
    """Without the launcher's pre-flight, the rollout rank finds the bad row; all ranks stop, rank 0 says it once."""
    data = _rows(tmp_path, [GOOD] * 20 + [{"messages": GOOD["messages"]}])
    result = torchrun(["train_grpo.py", "--train_data", data, "--output_dir", str(tmp_path / "out")], timeout=300)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert len(ours) == 1 and "no answer" in ours[0], result.stderr[-3000:]
    assert "EngineCore" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (["--policy_ranks", "1-4"], "beyond the world size 3"),
    (["--learning_rat", "1e-5"], "unrecognized arguments: --learning_rat"),
    ("bad-yaml", "mapping values are not allowed here"),
    ("corrupt-model", "cannot be loaded"),
    ("file-as-output-dir", "cannot be written"),
    ("previous-run", "holds a previous run (metrics.jsonl)"),
    *((case, BAD_FILES[case]) for case in ("no-tokenizer", "no-weights", "answer-object", "malformed-jsonl")),
])
def test_plain_torchrun_says_bad_input_in_one_line(tmp_path, args, words):
    """Without node.sh's pre-flight every rank runs the same checks (tgrpo.job.checks.check_job) before its process
    group starts; rank 0's line is printed before torchrun stops the others, and every rank exits 2 (torchrun's
    own status is 1 whenever a rank fails; its summary shows the ranks' 2)."""
    out = str(tmp_path / "out")
    if isinstance(args, str) and args in BAD_FILES:  # a model folder: every rank's checks; the data: the engine rank's, before its engine
        args = _bad_file(tmp_path, args)
    elif args == "bad-yaml":
        (tmp_path / "bad.yaml").write_text("max_steps: 3\nlearning_rate: 1e-5: x\n")
        args = ["--config", str(tmp_path / "bad.yaml")]
    elif args == "corrupt-model":
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text('{"model_type": "qwen2", "hidden_size": ')
        args = ["--model", str(tmp_path / "model")]
    elif args == "file-as-output-dir":
        (tmp_path / "f").write_text("")
        args, out = [], str(tmp_path / "f" / "out")
    elif args == "previous-run":
        os.makedirs(out)
        (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1}\n')
        args = []
    result = torchrun(["train_grpo.py", *args, "--output_dir", out], timeout=120)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and words in ours[0], result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr  # torchrun's summary: rank 0 exited 2 (torchrun's own traceback follows)
    assert result.stderr.count("Traceback") <= 1  # torchrun's, none of a rank's
    assert "EngineCore" not in result.stdout + result.stderr


@pytest.mark.slow
def test_node_sh_names_a_master_port_in_use(tmp_path):
    import socket

    with socket.socket() as busy:
        port = free_port()
        busy.bind(("", port))
        busy.listen()
        result = run(["bash", "launch/node.sh", "0", "127.0.0.1", "--", "--output_dir", str(tmp_path / "out")],
                     timeout=300, env={"PYTHON": sys.executable, "MASTER_PORT": str(port)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"MASTER_PORT {port} is in use" in lines[0], result.stderr
