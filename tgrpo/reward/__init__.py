"""Rewards from models: model (a sequence-classification reward model with its own tokenizer and chat template,
transformers, token-budget batches; the running normalisation of its scores), judge (an LLM judge on a frozen vLLM
engine of a judge rank; its verdict and score parsers) and service (a holder's scoring thread: groups scored as they
come, while the engines generate; their scores taken by key). Which reward_funcs entries are models is the shared
leaf tgrpo.reward_spec; tgrpo.job.model_rewards places them, sends them their groups and gathers their scores.

May import: tgrpo.rollout (the vLLM engine: every vLLM call lives in tgrpo.rollout.vllm_engine), tgrpo.sync,
tgrpo.policy and the shared leaves. Never tgrpo.job.
"""
