"""The real job (train_grpo.py, unchanged) with every completion generated to max_completion_length past any end of
turn: the rollout worker's `ignore_eos` set, the knob bench/step.py's `--lengths fixed` sets (vLLM's ignore_eos,
which leaves the logits and the sampled tokens' logprobs as they are). bench/trl_peer.py runs it beside TRL, whose
vLLM gets the same SamplingParams(ignore_eos=True), so both trainers do the same tokens a step.

    torchrun --nproc_per_node 1 bench/tgrpo_fixed_job.py <train_grpo.py flags>

A random model stops early only by chance (0.2-0.5% of 512-token completions), so this changes little; it makes the
two runs' work equal by construction instead of by chance.
"""
import os
import pkgutil
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker_classes():
    """tgrpo's RolloutWorker wherever the package keeps it (tgrpo.rollout.worker; tgrpo.rollout in older trees)."""
    try:
        from tgrpo.rollout.worker import RolloutWorker
        return [RolloutWorker]
    except ImportError:
        pass
    import importlib

    import tgrpo
    found = []
    for info in pkgutil.walk_packages(tgrpo.__path__, "tgrpo."):
        try:
            cls = getattr(importlib.import_module(info.name), "RolloutWorker", None)
        except Exception:  # a module with an optional dependency this job does not need
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return found


def force_fixed_lengths() -> None:
    classes = _worker_classes()
    if not classes:
        sys.exit("bench/tgrpo_fixed_job.py: no RolloutWorker class found in the tgrpo package")
    for cls in classes:
        init = cls.__init__

        def __init__(self, *args, _init=init, **kwargs):
            _init(self, *args, **kwargs)
            if not hasattr(self, "ignore_eos"):
                raise SystemExit("bench/tgrpo_fixed_job.py: RolloutWorker has no ignore_eos attribute any more")
            self.ignore_eos = True

        cls.__init__ = __init__


if __name__ == "__main__":  # vLLM's spawned engine re-imports this file as __mp_main__: nothing runs then
    sys.path.insert(0, ROOT)
    force_fixed_lengths()
    print("tgrpo_fixed_job: the rollout worker's ignore_eos is on (every completion max_completion_length tokens)",
          flush=True)
    sys.argv = [os.path.join(ROOT, "train_grpo.py")] + sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
