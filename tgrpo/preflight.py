"""Check a job before torchrun starts it: config, placement against the world size, model folder, data rows, and
the retriever of a multi-turn search job.

    python -m tgrpo.preflight WORLD_SIZE [train_grpo.py arguments]

Prints one line and exits 2 on bad input; builds the embedded tiny model if it is asked for and missing, so that
the ranks do not race to build it.
"""
import os
import sys

from tgrpo.config import ConfigError, load_config


def main() -> None:
    try:
        world_size = int(sys.argv[1])
    except (IndexError, ValueError):
        sys.exit("usage: python -m tgrpo.preflight WORLD_SIZE [train_grpo.py arguments]")
    try:
        cfg = load_config(sys.argv[2:])
        cfg.validate(world_size)
        from tgrpo.checkpoint import check_output_dir

        check_output_dir(cfg)
        from transformers import AutoTokenizer

        from tgrpo import data
        from tgrpo.trainer import resolve_model

        model_dir = resolve_model(cfg)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as e:  # a corrupt config.json or tokenizer file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"model '{cfg.model}' cannot be loaded ({first}): check its config.json and "
                              "tokenizer files, or download it again") from None
        data.load_prompts(cfg, tokenizer)
        if cfg.retriever_url and cfg.retriever_on_failure == "fail":
            from tgrpo.retriever import connect

            retriever, problem = connect(cfg)
            retriever.close()
            if problem:
                raise ConfigError(problem)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"output_dir={os.path.abspath(cfg.output_dir)}")  # the last line: launch/node.sh reads it


if __name__ == "__main__":
    main()
