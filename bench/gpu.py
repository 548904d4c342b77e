"""GPU measurements for the benchmarks: how busy a GPU was while a phase ran."""
from __future__ import annotations

import threading
import time


class Busy:
    """Mean NVML utilisation of this process's GPU over the windows between start() and stop(), polled every 20 ms.
    NVML's figure is the share of its last sample period (1/6 to 1 s) in which some kernel ran, from any process
    (vLLM's engine processes included). None where there is no GPU or no NVML."""

    def __init__(self):
        self.readings: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.handle = None
        try:
            import pynvml
            import torch

            if torch.cuda.is_available():
                pynvml.nvmlInit()
                uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
                self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
                self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no NVML: the benchmark reports no busy fraction
            self.handle = None

    def start(self) -> None:
        if self.handle is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.readings.append(self._nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu / 100.0)
            time.sleep(0.02)

    def fraction(self) -> float | None:
        return sum(self.readings) / len(self.readings) if self.readings else None

    def during(self, fn):
        """fn, wrapped so that every call of it is a window."""
        def wrapped(*args, **kwargs):
            self.start()
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop()
        return wrapped
