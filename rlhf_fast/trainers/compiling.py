"""A run's compile settings, applied the same way by every trainer: regional compilation of the GPT-2
blocks of its models (`rlhf_fast.model.compile_model`), the compile cache loaded before the first step
and saved after it and at the end, and the region's graphs counted per step / iteration for the logs."""

from __future__ import annotations

import torch

from rlhf_fast.model import compile_model, load_compile_cache, region_graphs, save_compile_cache
from rlhf_fast.model.compile import cache_dir

from .metrics import log


class RunCompiler:
    """`run.compile` (None: on for CUDA) over `modules`; `run.compile_backend`; `run.compile_cache` (or
    $RLHF_FAST_COMPILE_CACHE). Under ZeRO-3 (`partitioned`) nothing is compiled: the region reads the LoRA
    adapters before the modules' hooks have gathered their shards."""

    def __init__(self, run, device: torch.device, *modules, is_main: bool = True, partitioned: bool = False):
        self.enabled = run.compile if run.compile is not None else device.type == "cuda"
        if self.enabled and partitioned:
            log.warning("ZeRO-3 partitions the parameters: the model runs uncompiled (--no-compile to silence)")
            self.enabled = False
        self.cache = cache_dir(run.compile_cache) if self.enabled else None
        self.is_main, self.saved = is_main, False
        self.loaded = self.cache is not None and load_compile_cache(self.cache)  # a cache of an earlier run
        if self.loaded:
            log.info("compile cache loaded from %s", self.cache)
        if self.enabled:
            for m in modules:
                if m is not None:
                    compile_model(m, backend=run.compile_backend)
        self.graphs = region_graphs()

    def step_metrics(self) -> dict[str, int]:
        """After a step: {compile_graphs: graphs of the block region so far, compiles: new this step};
        the first step saves the compile cache. {} when not compiling."""
        if not self.enabled:
            return {}
        n = region_graphs()
        new, self.graphs = n - self.graphs, n
        if not self.saved:
            self.save()
        return {"compile_graphs": n, "compiles": new}

    def save(self) -> None:
        """Write the compile cache (main process; no-op without a cache directory)."""
        self.saved = True
        if self.cache is None or not self.is_main:
            return
        try:
            n = save_compile_cache(self.cache)
        except OSError as e:  # a full disk or a read-only directory costs the next run a compile, not this run
            log.warning("compile cache not saved to %s: %s", self.cache, e)
            return
        if n:
            log.info("compile cache: %d bytes saved to %s", n, self.cache)
