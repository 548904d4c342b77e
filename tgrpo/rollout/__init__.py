"""Rollout ranks, prompts -> samples: everything between a step's prompts and its scored Samples.

vllm_engine (every call into vLLM: engine, sampling, weight loading, sleep/wake, pause/resume), worker (a rollout
rank's share of a step: prompts -> completions with logprobs -> rewards -> advantages), stream (async_mode: groups
kept in flight, in-flight updates, each token's weights version), tools (multi-turn tool episodes), retriever (the
BM25 search server and its client), rewards (rule rewards, user functions, the remote reward service), http_client
(JSON services: chunks, in-flight limit, retries).

May import: tgrpo.sync (the engine is a WeightSink of the weight path), tgrpo.policy (LoRA's names for the
adapter an engine serves) and the shared leaves. Never tgrpo.job.
"""
