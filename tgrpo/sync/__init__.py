"""The weight path, policy -> engines.

buckets (weight layouts: bucket and ZeRO-3 shard plans, the shard join, the WeightSink protocol an engine
implements: tensors only) and weights (the sync itself: shards or gathered buckets -> broadcast over the sync
groups -> each engine's WeightSink).

May import: tgrpo.policy (the sender reads DeepSpeed's shards and LoRA's parameter names) and the shared leaves.
Never tgrpo.rollout (an engine is reached only through the WeightSink protocol) or tgrpo.job.
"""
