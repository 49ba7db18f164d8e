"""`rlhf-fast bench` at tiny sizes on CPU: the table, the JSON record and the PNG chart are well-formed and
self-consistent; bad settings fail with one line naming the flag, before anything runs. Speed is never judged
here (tiny CPU sizes say nothing about the GPU targets)."""

import gzip
import json
import math

import pytest
import torch

from rlhf_fast.benchmarking import BenchConfig
from rlhf_fast.cli import main

TINY = (
    "bench --device cpu --preset tiny --batch-size 4 --prompt-len 7 --new-tokens 4 --mini-batch-size 2 "
    "--warmup 0 --iters 1 --data synthetic"
).split()
GEN_IMPLS = ["ours eager", "ours CUDA graph", "hf generate (static cache, eager)", "no-KV-cache loop (seed)"]
PPO_IMPLS = ["ours (torch kernels, eager)", "ours (triton kernels, eager)"]


def _positive(row, *keys):
    for k in keys:
        assert isinstance(row[k], float) and math.isfinite(row[k]) and row[k] > 0, (row["impl"], k, row[k])


@pytest.mark.bench
def test_bench_cli_writes_table_record_and_chart(tmp_path, capsys):
    # Both kernel backends: without a GPU the triton rows run through the interpreter (conftest.py).
    assert main(TINY + ["--backend", "torch", "--backend", "triton", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for header in ("== generation", "== ppo", "== ppo memory / GPU", "== baseline", "== targets"):
        assert header in out
    for impl in GEN_IMPLS + PPO_IMPLS + ["seed-style"]:
        assert impl in out
    assert "GPU utilisation: not sampled (no CUDA device" in out

    records, charts = list(tmp_path.glob("e2e-tiny-cpu-*.json")), list(tmp_path.glob("e2e-tiny-cpu-*.png"))
    assert len(records) == 1 and len(charts) == 1 and charts[0].stem == records[0].stem
    assert f"record: {records[0]}" in out
    rec = json.loads(records[0].read_text())
    env = rec["environment"]
    assert env["device"].startswith("cpu")
    assert env["torch"] and env["triton"] and env["commit"] and env["time_utc"]
    cfg = rec["config"]
    assert (cfg["presets"], cfg["batch_size"], cfg["prompt_len"], cfg["new_tokens"], cfg["backends"]) == (
        ["tiny"],
        4,
        7,
        4,
        ["torch", "triton"],
    )
    assert cfg["dtype"] == "float32" and cfg["compile"] is False and rec["memory_cap"] is None
    assert rec["complete"] and rec["compile_cache"] == {"dir": None, "loaded": None, "bytes": None}
    # the end-to-end numbers first: ppo, then the baseline, then generation
    assert [r["section"] for r in rec["rows"]] == ["ppo"] * 2 + ["baseline"] + ["generation"] * 4
    assert [r["impl"] for r in rec["rows"][:2]] == PPO_IMPLS
    assert rec["gpu_monitor"] == {"available": False, "reason": "no CUDA device: GPU utilisation not sampled"}
    lengths = rec["prompt_lengths"]
    assert lengths["source"].startswith("synthetic") and 3 <= lengths["min"] <= lengths["max"] <= 7

    rows = {(r["section"], r["impl"]): r for r in rec["rows"]}
    assert all(r["preset"] == "tiny" for r in rec["rows"])
    gen = [rows[("generation", i)] for i in GEN_IMPLS]
    assert [r["status"] for r in gen] == ["ok", "skipped (CUDA graphs need CUDA)", "ok", "ok"]
    for r in (gen[0], gen[2], gen[3]):
        _positive(r, "seconds", "tokens_per_s", "first_call_s")
        assert r["tokens_per_s"] == pytest.approx(4 * 4 / r["seconds"])
        assert r["peak_alloc_gib"] is None and r["peak_reserved_gib"] is None  # no allocator stats on CPU
    assert gen[0]["x_vs_ours_eager"] == pytest.approx(1.0)

    for backend in ("torch", "triton"):
        r = rows[("ppo", f"ours ({backend} kernels, eager)")]
        assert r["status"] == "ok" and (r["backend"], r["mode"]) == (backend, "eager")
        timed = ("seconds", "samples_per_s", "experience_samples_per_s", "train_tokens_per_s", "generate_s")
        _positive(r, "first_iteration_s")  # model build -> end of the first iteration
        assert r["first_iteration_s"] <= r["first_iteration_from_process_start_s"]
        _positive(r, *timed, "score_s", "advantages_s", "train_s", "generate_fraction")
        experience_s = 4 / r["experience_samples_per_s"]
        # phases are timed inside the experience step, so they fit in it; experience + train = iteration
        assert r["generate_s"] + r["score_s"] + r["advantages_s"] <= experience_s * 1.001
        assert experience_s + r["train_s"] == pytest.approx(r["seconds"], rel=1e-3)
        assert r["samples_per_s"] == pytest.approx(4 / r["seconds"])
        assert r["train_tokens_per_s"] == pytest.approx(4 * (7 + 4) / r["train_s"])  # 1 epoch over (B, P + N)
        assert r["generate_fraction"] == pytest.approx(r["generate_s"] / r["seconds"])
        assert r["experience_peak_alloc_gib"] is None and r["iteration_gpu_util_mean"] is None
        assert r["gpu_util_reason"].startswith("no CUDA device")

    base = rows[("baseline", "seed-style (no KV cache, 4 models, eager, torch)")]
    assert base["status"] == "ok"
    _positive(base, "seconds", "samples_per_s", "generate_s", "score_s", "advantages_s", "train_s")
    phases = base["generate_s"] + base["score_s"] + base["advantages_s"] + base["train_s"]
    assert phases <= base["seconds"] * 1.001

    t = rec["targets"]["tiny"]
    assert set(t) == {"iteration_x_baseline", "iteration_gpu_util_pct", "generate_fraction", "cold_start_s"}
    ours = [rows[("ppo", i)] for i in PPO_IMPLS]
    best = min(ours, key=lambda r: r["seconds"])
    assert t["iteration_x_baseline"]["value"] == pytest.approx(base["seconds"] / best["seconds"])
    assert all(v["met"] is None for v in t.values())  # never judged off CUDA
    # no compiled row ran (CPU default): the cold start is the first PPO row's, and not judged
    assert rec["cold_start"]["impl"] == PPO_IMPLS[0] and not rec["cold_start"]["compiled"]
    assert t["cold_start_s"]["value"] == rows[("ppo", PPO_IMPLS[0])]["first_iteration_s"]

    png = charts[0].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    h, w, _ = matplotlib.image.imread(charts[0]).shape
    assert h > 100 and w > 100


@pytest.mark.bench
def test_bench_compiled_rows_cold_start_and_incremental_record(tmp_path, monkeypatch):
    """--no-eager --compile (dynamo disabled: the compiled rows' plumbing, eagerly): the cold start is the first
    compiled row's, judged against 60 s; the compile cache ($RLHF_FAST_COMPILE_CACHE, the trainer's) is noted; the
    record is rewritten after every row."""
    import torch._dynamo

    from rlhf_fast.benchmarking import run_bench

    monkeypatch.setenv("RLHF_FAST_COMPILE_CACHE", str(tmp_path / "cache"))
    cfg = BenchConfig(device="cpu", presets=("tiny",), batch_size=2, prompt_len=6, new_tokens=3, mini_batch_size=2,
                      warmup=0, iters=1, backends=("torch",), sections=("baseline", "ppo"), eager=False,
                      compile=True)
    seen = []
    with torch._dynamo.config.patch(disable=True):
        rec = run_bench(cfg, on_update=lambda r: seen.append((len(r["rows"]), r["complete"])))
    assert seen == [(1, False), (2, False), (2, True)]  # after each row, then complete
    assert [(r["section"], r["impl"]) for r in rec["rows"]] == [
        ("ppo", "ours (torch kernels, compiled)"), ("baseline", "seed-style (no KV cache, 4 models, eager, torch)")]
    cold, ppo = rec["cold_start"], rec["rows"][0]
    assert cold["compiled"] and cold["seconds"] == ppo["first_iteration_s"] > 0
    assert not cold["compile_cache_loaded"] and rec["targets"]["tiny"]["cold_start_s"]["target"] == "<= 60"
    assert ppo["compiles_after_first"] == 0  # the trainer's own count of new graphs per iteration
    cache = rec["compile_cache"]
    assert cache["dir"] == str(tmp_path / "cache") and not cache["loaded"]
    # the trainer saved after its first iteration whatever this process compiled so far (other tests' too)
    saved = tmp_path / "cache" / "compile_cache.bin"
    assert cache["bytes"] == (saved.stat().st_size if saved.exists() else None)


def test_bench_prompt_lengths_follow_hh_rlhf(tmp_path):
    from rlhf_fast.benchmarking.suite import BenchConfig, prompt_lengths

    path = tmp_path / "hh.jsonl.gz"
    dialogues = ["\n\nHuman: " + "x" * n + "\n\nAssistant: ok" for n in (5, 40, 400)]
    with gzip.open(path, "wt") as f:
        for d in dialogues:
            f.write(json.dumps({"chosen": d, "rejected": d + "!"}) + "\n")
    cfg = BenchConfig(
        device="cpu",
        presets=("tiny",),
        batch_size=9,
        prompt_len=30,
        new_tokens=4,
        mini_batch_size=3,
        data=str(path),
    )
    lengths, source = prompt_lengths(cfg)
    # prompt = dialogue up to its last "\n\nAssistant:" -> 8 + n + 12 bytes; ~4 bytes per GPT-2 token, capped
    allowed = {round((8 + n + 12) / 4) for n in (5, 40)} | {30}
    assert len(lengths) == 9 and set(lengths) <= allowed and source.startswith("hh-rlhf hh.jsonl.gz")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-vram-gb", "16"], "16 emulates a smaller GPU: it needs a CUDA device (this run is on cpu) and a "
                                  "size > 0 (--max-vram-gb)"),
        (["--batch-size", "0"], "must be >= 1, got 0 (--batch-size)"),
        (["--mini-batch-size", "3"], "3 does not divide the batch size 4 (whole minibatches per PPO epoch) "
                                     "(--mini-batch-size)"),
        (["--preset", "gpt3"], "unknown preset(s) ['gpt3']"),
        (["--prompt-len", "125"], "exceeds tiny's context of 128 positions (--prompt-len)"),
        (["--data", "auto"], "auto not found (an HH-RLHF .jsonl(.gz) file or directory, or synthetic) (--data)"),
        (["--no-eager", "--no-compile"], "--no-eager with --no-compile leaves no PPO row to time (--eager)"),
    ],
)
def test_bench_bad_arguments_fail_clearly(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--out-dir", str(tmp_path)] + args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-fast: error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_bench_missing_data_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(TINY[:-1] + [str(tmp_path / "nope.jsonl"), "--out-dir", str(tmp_path)])
    assert e.value.code == 2 and "nope.jsonl not found" in capsys.readouterr().err


def test_bench_config_takes_the_device_defaults(monkeypatch):
    cpu = BenchConfig(device="cpu", batch_size=6, mini_batch_size=3)
    assert (cpu.presets, cpu.batch_size, cpu.mini_batch_size, cpu.prompt_len, cpu.dtype, cpu.compile) == (
        ("tiny",), 6, 3, 12, "float32", False)
    assert cpu.sections == ("ppo", "baseline", "generation") and cpu.eager
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as --device checks
    gpu = BenchConfig(device="cuda")  # built without touching the device
    assert (gpu.presets, gpu.batch_size, gpu.prompt_len, gpu.new_tokens, gpu.dtype, gpu.compile) == (
        ("gpt2", "gpt2-medium"), 64, 256, 128, "bfloat16", True)


@pytest.mark.gpu
@pytest.mark.bench
def test_bench_on_gpu_records_memory_and_cap(tmp_path):
    args = (
        "bench --device cuda --preset tiny --batch-size 6 --prompt-len 33 --new-tokens 17 "
        "--mini-batch-size 2 --warmup 1 --iters 1 --max-vram-gb 16"
    ).split()
    assert main(args + ["--out-dir", str(tmp_path)]) == 0
    rec = json.loads(next(tmp_path.glob("e2e-*.json")).read_text())
    assert rec["memory_cap"]["max_vram_gb"] == 16 and 0 < rec["memory_cap"]["memory_fraction"] <= 1
    for r in rec["rows"]:
        if r["section"] == "ppo":
            assert r["status"] == "ok"
            assert 0 < r["experience_peak_alloc_gib"] <= r["experience_peak_reserved_gib"] <= 16
            assert 0 < r["train_peak_alloc_gib"] <= r["train_peak_reserved_gib"] <= 16
    if rec["gpu_monitor"]["available"]:
        assert any(r.get("iteration_gpu_util_mean") is not None for r in rec["rows"])
    else:
        assert "nvidia-ml-py" in rec["gpu_monitor"]["reason"] or "NVML" in rec["gpu_monitor"]["reason"]
