"""What a benchmark result is recorded with: the environment (device, versions, commit), peak memory per
phase, and GPU utilisation / memory sampled by NVML in a background thread while the run goes on."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import threading
import time
from pathlib import Path

import torch

GIB = 2**30
REPO_ROOT = Path(__file__).resolve().parents[2]


def git_commit(cwd: Path = REPO_ROOT) -> str:
    """Short commit of the checkout, with "-dirty" when tracked files are modified; "unknown" outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Device name, versions, commit and time: what every recorded result carries. $GIT_COMMIT, when set,
    is the commit: a copy of the tree on another machine may carry no (or stale) git metadata."""
    cuda = torch.cuda.is_available()
    env = {
        "device": torch.cuda.get_device_name(0)
        if cuda
        else f"cpu ({platform.processor() or platform.machine()})",
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "flash_attn": _version("flash-attn"),
        "nvidia_ml_py": _version("nvidia-ml-py"),
        "python": platform.python_version(),
        "commit": os.environ.get("GIT_COMMIT") or git_commit(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
    }
    if cuda:
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
    return env


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseMemory:
    """Peak allocated / reserved CUDA memory of one phase: reset on entry, read on exit. On CPU the
    fields stay None (torch keeps no allocator statistics there)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.allocated_gib: float | None = None
        self.reserved_gib: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.allocated_gib = torch.cuda.max_memory_allocated(self.device) / GIB
            self.reserved_gib = torch.cuda.max_memory_reserved(self.device) / GIB
        return False


class GpuSampler:
    """Samples GPU utilisation (%) and used memory (GiB) through NVML every `interval` seconds in a
    daemon thread. `window(t0, t1)` summarises the samples taken between two perf_counter times.

    Without CUDA or without nvidia-ml-py, `available` is False and `reason` says why; nothing is sampled.
    """

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.interval, self.samples = interval, []  # (perf_counter, util %, used GiB)
        self.available, self.reason, self._handle = False, None, None
        self._stop = threading.Event()
        self._thread = None
        if device.type != "cuda":
            self.reason = "no CUDA device: GPU utilisation not sampled"
            return
        try:
            import pynvml  # nvidia-ml-py, in the `bench` extra
        except ImportError:
            self.reason = "nvidia-ml-py not installed (pip install 'rlhf_fast[bench]')"
            return
        try:
            pynvml.nvmlInit()
            self._handle = _nvml_handle(pynvml, device)
        except pynvml.NVMLError as e:
            self.reason = f"NVML unavailable: {e}"
            return
        self._nvml, self.available = pynvml, True

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._nvml.nvmlShutdown()
        return False

    def _run(self):
        nvml, h = self._nvml, self._handle
        while not self._stop.is_set():
            util = nvml.nvmlDeviceGetUtilizationRates(h).gpu
            used = nvml.nvmlDeviceGetMemoryInfo(h).used / GIB
            self.samples.append((time.perf_counter(), float(util), used))
            self._stop.wait(self.interval)

    def window(self, t0: float, t1: float) -> dict:
        """{gpu_util_mean, gpu_util_min, gpu_mem_used_max_gib, samples} over [t0, t1]; Nones (and the
        reason) when nothing could be sampled."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if not inside:
            reason = self.reason or "window shorter than the sampling interval"
            return {
                "gpu_util_mean": None,
                "gpu_util_min": None,
                "gpu_mem_used_max_gib": None,
                "samples": 0,
                "gpu_util_reason": reason,
            }
        utils = [s[1] for s in inside]
        return {
            "gpu_util_mean": sum(utils) / len(utils),
            "gpu_util_min": min(utils),
            "gpu_mem_used_max_gib": max(s[2] for s in inside),
            "samples": len(inside),
        }


def _nvml_handle(pynvml, device: torch.device):
    """The NVML handle of torch's device; matched by UUID because CUDA_VISIBLE_DEVICES renumbers devices."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def cap_memory(max_vram_gb: float, device: torch.device) -> dict:
    """Emulate a card with `max_vram_gb` GiB: the caching allocator refuses to grow past that fraction of
    the real card (allocations beyond it raise OutOfMemoryError, as on the smaller card)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(
            f"--max-vram-gb {max_vram_gb} emulates a smaller GPU and needs a CUDA device; "
            f"this run is on {device}"
        )
    if max_vram_gb <= 0:
        raise ValueError(f"--max-vram-gb must be > 0, got {max_vram_gb}")
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, max_vram_gb * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return {"max_vram_gb": max_vram_gb, "memory_fraction": fraction, "card_gib": total / GIB}
