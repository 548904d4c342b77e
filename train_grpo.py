"""GRPO trainer entry point: one torchrun world, vLLM rollout ranks and DeepSpeed ZeRO-3 policy ranks.

    torchrun --nproc_per_node 3 train_grpo.py --config configs/default.yaml
    bash launch/node.sh 0 127.0.0.1            # the same, from the hostfile
    python train_grpo.py --help                # every option
"""
from tgrpo.job.trainer import main

if __name__ == "__main__":  # vLLM starts its engine in a spawned child, which re-imports this file
    main()
