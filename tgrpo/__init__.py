"""tgrpo: GRPO in one torchrun world, vLLM rollout ranks and DeepSpeed ZeRO-3 policy ranks, no Ray.

The package is layered; every import points down this list (tests/test_imports.py checks it):

    job/       the job around the two sides: a rank's life, placement and groups, checks and pre-flight, the
               step loop, checkpoints, metrics, the watchdog    may import reward, rollout, sync, policy, leaves
    reward/    rewards from models, after the gather: a reward model (transformers), an LLM judge (a frozen vLLM
               engine)                                                  may import rollout, sync, policy, leaves
    rollout/   rollout ranks, prompts -> samples: the vLLM engine, episodes and tools, rewards, async streams
                                                                        may import sync, policy, leaves
    sync/      the weight path, policy -> engines: bucket and shard plans, the broadcast
                                                                        may import policy, leaves
    policy/    policy ranks, samples -> update: DeepSpeed, the forward, the loss step, LoRA, the critic
                                                                        may import leaves
    config, errors, console, algorithm, batch, data, vision, search_protocol, tiny, reward_spec
               shared leaves: values, errors, what people see, the pure algorithm, the Sample contract between
               the two sides, prompts, images and the processor that sizes them, the search tool's text, the
               embedded models, what reward_funcs names besides rules; they import only each other
               (errors nothing, config only errors)

Each package's __init__ holds only its docstring: importing a package runs nothing.
"""
