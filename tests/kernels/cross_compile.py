"""Cross-compile every Triton kernel launch of the project for sm_80/86/89/90 on a machine without a GPU.

How: the kernel launchers are run on CPU tensors at GPT-2 shapes while `rlhf_fast.kernels.launch` is
patched to report the chosen target architecture and to record each launch instead of running it
(autotuned kernels contribute every config their pruning keeps for that target). Each distinct launch
(kernel, constexprs, options, argument types/alignment as Triton itself specialises them, float scalars
typed fp64 as torch.compile passes them) is compiled with Triton's compiler for that target; ptxas's own
report gives registers, spills and stack, Triton's metadata shared memory, the PTX its wgmma / mma.sync
instructions. From those follow the CTAs one SM holds (registers, shared memory, threads and blocks
against the target's per-SM limits). No GPU, no driver.

The table lives in `cross_compile_record.json` beside this file, keyed by a hash of each kernel's
source (with everything it calls), its specialisation and the target, so CI compiles only what the
record does not hold plus a fixed always-compiled subset (bf16 on sm_86, the tightest production
target). `test_cross_compile.py` fails when a launch is missing from the record, exceeds a target's
shared memory, spills in a 16-bit config, or (sm_90) compiles a 16-bit dot of >= 64 rows to mma.sync
rather than wgmma (it runs at a fraction of the tensor-core rate there); and when a streaming kernel's
grid at GPT-2 XL token counts leaves SMs idle (fewer CTAs than SMs). It warns at 1 CTA/SM for a
non-persistent kernel: nothing then hides one CTA's memory latency behind another's work.

    python tests/kernels/cross_compile.py --write    # refresh the record after changing a kernel
    python tests/kernels/cross_compile.py --check    # what the test runs (prints the worst cases)

Must run without TRITON_INTERPRET (the interpreter's kernels cannot be compiled for a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cross_compile_scenarios import scenarios, xl_scenarios  # noqa: E402 (beside this file)

RECORD = Path(__file__).with_name("cross_compile_record.json")
# SMs of the smallest common card per target, so split-KV decode takes the paths it takes there.
TARGET_SMS = {80: 108, 86: 48, 89: 46, 90: 132}
ALWAYS_COMPILE = {"target": 86, "dtype": "bfloat16"}
# Per-SM limits (CUDA programming guide, compute-capability table): 64K registers on every target.
SM_REGISTERS = 65536
SM_THREADS = {80: 2048, 86: 1536, 89: 1536, 90: 2048}
SM_BLOCKS = {80: 32, 86: 16, 89: 24, 90: 32}
SM_SHARED = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}
CTA_RESERVED_SHARED = 1024  # the driver's own shared memory in every CTA (sm_80 on)
# Memory-bound kernels whose grid grows with the token count: at GPT-2 XL scale each must launch at least
# one CTA per SM, or part of the GPU's bandwidth sits idle. The GEMM-like and attention training kernels
# are compute-bound; the PPO/GAE kernels move a few fp32 per token (microseconds: launch-bound).
STREAMING = ("_lora_project_kernel", "_lora_adapter_grad_kernel", "_lora_grad_reduce_kernel",
             "_attn_decode_split_kernel")


@dataclass
class Case:
    kernel: str
    config: str  # constexprs + num_warps/num_stages, one line
    dtype: str  # the dtype of the launch's data (the scenario's), e.g. "bfloat16"
    target: int
    key: str
    scenario: str
    warps: int
    persistent: bool  # loops over its work with a grid-sized stride (tl.num_programs): one wave by design


@dataclass
class Row(Case):
    registers: int
    shared: int
    smem_limit: int
    spill_stores: int
    spill_loads: int
    stack: int
    wgmma: int  # wgmma.mma_async instructions in the PTX
    mma_sync: int  # mma.sync instructions in the PTX
    tall_dots_mma_sync: int  # 16-bit dots of >= 64 rows that Triton lowered to mma.sync, not wgmma
    ctas_per_sm: int
    error: str = ""


@dataclass
class Grid:
    """A launch's grid at GPT-2 XL token counts against its target's SMs."""

    kernel: str
    dtype: str
    target: int
    scenario: str
    ctas: int
    sms: int


# ----------------------------------------------------------------------------------------------
# Capturing launches


class _Recorder:
    def __init__(self, kernel, sink):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.kernel, grid, args, kwargs))

        return launch


@contextlib.contextmanager
def capturing(target: int):
    """Within: launchers think they run on `target` and record their launches (kernel, grid, args,
    kwargs) into the yielded list."""
    from rlhf_fast.kernels import launch

    names = ("arch", "num_sms", "wrap", "require_launchable")
    saved = {n: getattr(launch, n) for n in names}
    sink: list = []
    launch.arch = lambda device: target
    launch.num_sms = lambda device: TARGET_SMS[target]
    launch.wrap = lambda kernel: _Recorder(kernel, sink)
    launch.require_launchable = lambda device, name: None
    try:
        yield sink
    finally:
        for n, v in saved.items():
            setattr(launch, n, v)


# Launch options torch.library.wrap_triton accepts besides the kernel's constexprs (it refuses num_ctas).
LAUNCH_OPTIONS = {"num_warps", "num_stages"}


def _expand(kernel, grid, args, kwargs):
    """(JITFunction, grid tuple, args, kwargs incl. meta) for a recorded launch; one per config for an
    autotuner. A callable grid gets the arguments and the config's meta, as Triton calls it."""
    from triton.runtime.autotuner import Autotuner

    named = dict(zip(kernel.arg_names, args))
    if not isinstance(kernel, Autotuner):
        extra = set(kwargs) - {p.name for p in kernel.params} - LAUNCH_OPTIONS
        if extra:
            raise ValueError(f"{kernel.__name__}: launch options {sorted(extra)} (torch.compile's wrap_triton "
                             "takes only num_warps / num_stages; put the rest in a triton.Config)")
        return [(kernel, _grid(grid, named, kwargs), args, kwargs)]
    configs = kernel.configs
    if kernel.early_config_prune:
        configs = kernel.early_config_prune(configs, named, **kwargs)
    out = []
    for cfg in configs:
        meta = dict(kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        out.append((kernel.fn, _grid(grid, named, meta), args, meta))
    return out


def _grid(grid, named: dict, meta: dict) -> tuple:
    return tuple(grid(dict(named, **meta)) if callable(grid) else grid)


def launch_grids(targets=(80, 86, 89, 90), dtypes=("float32", "float16", "bfloat16")) -> list[Grid]:
    """The grids of the STREAMING kernels' launches in the GPT-2 XL scenarios, per target and dtype."""
    out = []
    for target in targets:
        for dtype in dtypes:
            for scenario, run in xl_scenarios(dtype):
                with capturing(target) as sink:
                    run()
                    launches = [x for rec in sink for x in _expand(*rec)]
                for fn, grid, _, _ in launches:
                    g = Grid(fn.__name__, dtype, target, scenario, math.prod(grid), TARGET_SMS[target])
                    if g.kernel in STREAMING and g not in out:
                        out.append(g)
    return out


def enumerate_cases(targets=(80, 86, 89, 90), dtypes=("float32", "float16", "bfloat16")):
    """[(Case, compile thunk)] for every distinct launch of every scenario, per target and dtype."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    seen = {}
    for target in targets:
        gpu = GPUTarget("cuda", target, 32)
        backend = make_backend(gpu)
        for dtype in dtypes:
            for scenario, run in scenarios(dtype):
                with capturing(target) as sink:  # autotuner pruning asks launch.arch too: expand inside
                    run()
                    launches = [x for rec in sink for x in _expand(*rec)]
                for fn, _, args, kwargs in launches:
                    binder = create_function_from_signature(fn.signature, fn.params, backend)
                    bound, spec, opts = binder(*args, **kwargs)
                    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
                    # Float scalars as fp64: what torch.compile's inductor passes (a Python float may not
                    # fit fp32 exactly). Kernels cast them to fp32 once; `_compile` rejects fp64 maths.
                    signature = {k: "fp64" if v == "fp32" else v for k, v in signature.items()}
                    # One compile per distinct config (declared constexprs, warps, stages) of a kernel, dtype
                    # and target: Triton's extra specialisations (an int arg equal to 1, divisibility by
                    # 16) change neither tiles nor the shared-memory / register budget in a meaningful way.
                    consts = " ".join(f"{p.name}={constexprs[(p.num,)]}" for p in fn.params if p.is_constexpr)
                    config = f"{consts} warps={options.num_warps} stages={options.num_stages}"
                    if (fn.__name__, config, dtype, target) in seen:
                        continue
                    key = hashlib.sha256(repr((fn.cache_key, sorted(signature.items()), sorted(
                        (k, str(v)) for k, v in constexprs.items()), sorted(attrs.items()), target,
                        options.num_warps, options.num_stages)).encode()).hexdigest()[:20]
                    case = Case(fn.__name__, config, dtype, target, key, scenario, options.num_warps,
                                persistent="num_programs" in fn.src)
                    src = ASTSource(fn, signature, constexprs, attrs)
                    seen[fn.__name__, config, dtype, target] = (case, lambda src=src, gpu=gpu, o=options:
                                                                 _compile(src, gpu, o))
    return list(seen.values())


_REGS = re.compile(r"Used (\d+) registers")
# A dot Triton left on mma.sync (a wgmma one is ttng.warp_group_dot), with 16-bit operands: its M.
_SYNC_DOT_M = re.compile(r"= tt\.dot [^:]*: tensor<(\d+)x\d+x(?:bf16|f16)[,>]")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile(src, gpu, options) -> dict:
    import triton
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True
    with tempfile.TemporaryFile(mode="w+") as log:  # ptxas -v reports on the process's own stdout/stderr
        sys.stdout.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            kernel = triton.compile(src, target=gpu, options=options.__dict__)
        finally:
            sys.stdout.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        log.seek(0)
        text = log.read()
    fp64 = [ln.strip() for ln in kernel.asm["ttir"].splitlines()
            if "f64" in ln and "tt.func" not in ln and "arith.truncf" not in ln]
    if fp64:
        raise RuntimeError(f"fp64 maths from a float argument (cast it to fp32 once): {fp64[0][:120]}")
    regs, frame = _REGS.search(text), _FRAME.search(text)
    if regs is None or frame is None:
        raise RuntimeError(f"no ptxas report for {src.name} (is the Triton cache on? set TRITON_ALWAYS_COMPILE=1)")
    regs = int(regs.group(1))
    stack, stores, loads = (int(x) for x in frame.groups())
    ptx = kernel.asm["ptx"]
    tall_sync = [m for m in _SYNC_DOT_M.findall(kernel.asm["ttgir"]) if int(m) >= 64]
    return dict(registers=regs, shared=int(kernel.metadata.shared), spill_stores=stores, spill_loads=loads,
                stack=stack, wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
                mma_sync=len(re.findall(r"\bmma\.sync", ptx)), tall_dots_mma_sync=len(tall_sync))


# ----------------------------------------------------------------------------------------------
# Record


def load_record(path: Path = RECORD) -> dict:
    if not path.exists():
        return {"rows": []}
    return json.loads(path.read_text())


FIGURES = ("registers", "shared", "spill_stores", "spill_loads", "stack", "wgmma", "mma_sync", "tall_dots_mma_sync")


def recorded(record: dict) -> dict:
    """{key: row} of the record's rows that hold every figure (rows of an older checker are recompiled)."""
    return {r["key"]: r for r in record.get("rows", []) if all(f in r for f in FIGURES)}


def ctas_per_sm(registers: int, shared: int, warps: int, target: int) -> int:
    """CTAs of a launch one SM holds at once: the tightest of its register (allocated 256 a warp, i.e.
    in steps of 8 a thread), shared-memory, thread and block limits."""
    warps_by_regs = SM_REGISTERS // (-(-max(registers, 1) // 8) * 8 * 32)
    return min(warps_by_regs // warps, SM_SHARED[target] // (shared + CTA_RESERVED_SHARED),
               SM_THREADS[target] // (32 * warps), SM_BLOCKS[target])


def _compile_one(case, compile_fn) -> dict:
    try:
        return dict(compile_fn(), error="")
    except Exception as e:  # a compile failure is a row of the table, not a crash of the tool
        return dict(dict.fromkeys(FIGURES, 0), error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")


def compile_cases(cases, keys: set, jobs: int = 1, log=print) -> dict:
    """{key: figures + error} for the cases whose key is in `keys`, over `jobs` processes."""
    todo = [(c, fn) for c, fn in cases if c.key in keys]
    if jobs <= 1 or len(todo) < 2:
        out, t0 = {}, time.time()
        for i, (case, fn) in enumerate(todo):
            out[case.key] = _compile_one(case, fn)
            log(f"[{i + 1}/{len(todo)} {time.time() - t0:4.0f}s] {case.kernel} sm_{case.target} {case.dtype} "
                f"{case.config}: {out[case.key]}")
        return out
    with tempfile.TemporaryDirectory() as tmp:  # compile thunks do not pickle: each worker re-enumerates
        keys_file = Path(tmp, "keys.json")
        keys_file.write_text(json.dumps(sorted(keys)))
        procs = [subprocess.Popen([sys.executable, __file__, "--shard", f"{k}/{jobs}", "--keys", str(keys_file),
                                   "--json", str(Path(tmp, f"{k}.json"))]) for k in range(jobs)]
        if any(p.wait() for p in procs):
            raise RuntimeError("a cross-compile worker failed (see its output above)")
        return {k: v for i in range(jobs) for k, v in json.loads(Path(tmp, f"{i}.json").read_text()).items()}


def build_rows(cases, record: dict, compile_all: bool = False, always=ALWAYS_COMPILE, jobs: int = 1) -> list[Row]:
    """Rows for `cases`: figures from `record` when it holds the key, compiled otherwise (and for `always`)."""
    from rlhf_fast.kernels.launch import smem_limit

    known = recorded(record)
    fresh = {c.key for c, _ in cases if compile_all or c.key not in known
             or all(getattr(c, k) == v for k, v in always.items())}
    compiled = compile_cases(cases, fresh, jobs)
    rows = []
    for case, _ in cases:
        got = compiled.get(case.key) or {k: known[case.key][k] for k in (*FIGURES, "error")}
        ctas = 0 if got["error"] else ctas_per_sm(got["registers"], got["shared"], case.warps, case.target)
        rows.append(Row(**asdict(case), **got, smem_limit=smem_limit(case.target), ctas_per_sm=ctas))
    return rows


def _where(r: Row) -> str:
    return f"{r.kernel} sm_{r.target} {r.dtype} [{r.config}] ({r.scenario})"


def problems(rows: list[Row]) -> list[str]:
    out = []
    for r in rows:
        if r.error:
            out.append(f"{_where(r)}: does not compile: {r.error}")
            continue
        if r.shared > r.smem_limit:
            out.append(f"{_where(r)}: {r.shared} B shared memory > the target's {r.smem_limit} B")
        if r.dtype != "float32" and (r.spill_stores or r.spill_loads):
            out.append(f"{_where(r)}: spills {r.spill_stores} B stores / {r.spill_loads} B loads in a 16-bit config")
        if r.target == 90 and r.tall_dots_mma_sync:
            out.append(f"{_where(r)}: {r.tall_dots_mma_sync} 16-bit dot(s) of >= 64 rows compiled to mma.sync, not "
                       f"wgmma ({r.wgmma} wgmma / {r.mma_sync} mma.sync instructions; wgmma wants warps in "
                       "multiples of 4 and 64 rows a warpgroup)")
    return out


def wave_problems(grids: list[Grid]) -> list[str]:
    return [f"{g.kernel} sm_{g.target} {g.dtype} ({g.scenario}): {g.ctas} CTAs < {g.sms} SMs: a streaming "
            "kernel must launch at least one CTA per SM, or those SMs' bandwidth goes unused"
            for g in grids if g.ctas < g.sms]


def occupancy_warnings(rows: list[Row]) -> list[str]:
    return [f"{_where(r)}: 1 CTA/SM ({r.registers} registers x {r.warps} warps, {r.shared} B shared): nothing "
            "hides its memory latency behind another CTA's work" for r in rows
            if r.ctas_per_sm == 1 and not r.persistent and not r.error]


def worst_cases(rows: list[Row]) -> list[str]:
    """Per target: the most shared memory, most registers and most spilling launch."""
    lines = []
    for target in sorted({r.target for r in rows}):
        rs = [r for r in rows if r.target == target]
        smem = max(rs, key=lambda r: r.shared)
        regs = max(rs, key=lambda r: r.registers)
        spill = max(rs, key=lambda r: r.spill_stores)
        single = sum(r.ctas_per_sm == 1 for r in rs)
        lines.append(f"sm_{target}: {len(rs)} launches; max shared {smem.shared}/{smem.smem_limit} B "
                     f"({smem.kernel} {smem.dtype} {smem.config}); max registers {regs.registers} ({regs.kernel} "
                     f"{regs.dtype}); max spill stores {spill.spill_stores} B ({spill.kernel} {spill.dtype} "
                     f"{spill.config}); {single} launches at 1 CTA/SM")
    return lines


def wave_summary(grids: list[Grid]) -> list[str]:
    """Per target: each streaming kernel's fewest CTAs at the GPT-2 XL token counts."""
    lines = []
    for target in sorted({g.target for g in grids}):
        fewest = {}
        for g in grids:
            if g.target == target and (g.kernel not in fewest or g.ctas < fewest[g.kernel].ctas):
                fewest[g.kernel] = g
        lines.append(f"sm_{target} ({TARGET_SMS[target]} SMs), fewest CTAs at GPT-2 XL token counts: " + "; ".join(
            f"{k} {g.ctas} ({g.dtype}, {g.scenario})" for k, g in sorted(fewest.items())))
    return lines


def write_record(rows: list[Row], path: Path = RECORD) -> None:
    import triton

    rows = sorted(rows, key=lambda r: (r.kernel, r.target, r.dtype, r.config))
    payload = {"triton": triton.__version__, "generated_by": "python tests/kernels/cross_compile.py --write",
               "columns": list(asdict(rows[0]).keys()) if rows else [],
               "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(payload, indent=0) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="compile what the record lacks and rewrite it")
    p.add_argument("--all", action="store_true", help="compile everything, ignoring the record")
    p.add_argument("--check", action="store_true", help="fail if the record is stale or a launch is over a limit")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--json", help="also write the rows and problems here")
    p.add_argument("--shard", help=argparse.SUPPRESS)  # worker: "k/n" of --keys, figures to --json
    p.add_argument("--keys", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("cross_compile: unset TRITON_INTERPRET (interpreted kernels cannot be compiled for a GPU)")
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # every compile must run ptxas to report its figures
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    cases = enumerate_cases()
    if args.shard:
        k, n = (int(x) for x in args.shard.split("/"))
        keys = sorted(set(json.loads(Path(args.keys).read_text())) & {c.key for c, _ in cases})
        Path(args.json).write_text(json.dumps(compile_cases(cases, set(keys[k::n]))))
        return 0
    record = load_record()
    rows = build_rows(cases, record, compile_all=args.all, jobs=args.jobs)
    grids = launch_grids()
    found = problems(rows) + wave_problems(grids)
    warned = occupancy_warnings(rows)
    known = recorded(record)
    stale = [r for r in rows if r.key not in known]
    print("\n".join(worst_cases(rows) + wave_summary(grids)))
    if args.write:
        write_record(rows)
        print(f"wrote {RECORD} ({len(rows)} rows)")
    elif stale:
        found.append(f"{len(stale)} launches are not in {RECORD.name} (e.g. {stale[0].kernel} sm_{stale[0].target} "
                     f"{stale[0].dtype} {stale[0].config}): run `python tests/kernels/cross_compile.py --write`")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [asdict(r) for r in rows], "grids": [asdict(g) for g in grids],
                                               "problems": found, "warnings": warned}))
    for line in warned:
        print("WARNING:", line)
    for line in found:
        print("PROBLEM:", line)
    return 1 if found and (args.check or args.write) else 0


if __name__ == "__main__":
    raise SystemExit(main())
