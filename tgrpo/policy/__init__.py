"""Policy ranks, samples -> update.

deepspeed_engine (every call into DeepSpeed), modeling (the model's forward on a packed micro-batch), worker (the
policy and reference ranks: token logprobs, the clipped loss, one DeepSpeed step per mini-batch), critic (PPO's
value model), lora (the peft adapter: which parameters, their names in peft's files and in vLLM).

May import: the shared leaves only (tgrpo.algorithm for the losses, tgrpo.batch for the Samples it trains on).
"""
