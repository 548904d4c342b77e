"""The job around the two sides: what every rank runs, whatever its role.

trainer (connect, set up, the step loop, finish), rank_life (checks, node log, signals, init with timeouts, one-line
failures), placement (rank ranges -> roles, every process group), checks and preflight (every check that touches
the world, before anything expensive starts), memory (the memory plan), checkpoint (save, verify, resume), metrics
(tensorboard, metrics.jsonl, the progress bar), watchdog (heartbeats, the hang report), failures (node.sh's root
cause of a failed job), build_locks (stale op-build locks), model_rewards (who scores with the reward models and
the judge, and how their scores reach every rank).

May import: tgrpo.reward, tgrpo.rollout, tgrpo.sync, tgrpo.policy and the shared leaves. Nothing below imports the
job: the other packages get what they need from it as arguments (e.g. the rollout worker's on_engine_death
callback).
"""
