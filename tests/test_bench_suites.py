"""Every suite under benchmarks/ at its --smoke sizes on CPU, in this process (`main([...])`, as
`python -m benchmarks.<name> --smoke` runs it): the record is written where --out-dir says, holds the baseline
rows timed in the same run and the ratios against them. Speed is never judged here: on CPU the Triton kernels
run through the interpreter and every ratio is meaningless."""

import json
import math

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _record(tmp_path, pattern: str) -> dict:
    records = list(tmp_path.glob(pattern))
    assert len(records) == 1, sorted(p.name for p in tmp_path.iterdir())
    rec = json.loads(records[0].read_text())
    env = rec["environment"]
    assert env["device"].startswith("cpu") and env["torch"] and env["commit"] and env["time_utc"]
    return rec


def _ratio(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture
def no_compile():
    """torch.compile'd baselines run eagerly (a CPU inductor compile takes minutes; this checks plumbing). Through
    dynamo's own config.patch: a monkeypatched attribute of its config module can vanish (seen with torch 2.13)."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def test_lora_linear_groups_have_baseline_floor_and_ratios(tmp_path, capsys):
    from benchmarks import bench_lora_linear

    assert bench_lora_linear.main(["--smoke", "--rounds", "1", "--out-dir", str(tmp_path)]) == 0
    rec = _record(tmp_path, "lora_linear-cpu-*.json")
    assert f"record: {next(tmp_path.iterdir())}" in capsys.readouterr().out
    groups = {}
    for r in rec["rows"]:
        groups.setdefault(r["group"], {})[r["impl"]] = r
    assert len(groups) == 3 and {g.split()[0] for g in groups} == {"fwd", "bwd", "fwdbwd"}
    for rows in groups.values():
        assert set(rows) == {"auto", "torch", "triton", "eager_peft", "plain_linear"}
        base, floor = rows["eager_peft"], rows["plain_linear"]
        assert base["baseline"] and floor["floor"] and base["speedup_vs_baseline"] == 1.0 and floor["x_floor"] == 1.0
        for ours in (rows["auto"], rows["torch"], rows["triton"]):
            assert not ours["baseline"] and ours["clock"] == "wall" and ours["wall_ms"] == ours["median_ms"]
            assert ours["speedup_vs_baseline"] == pytest.approx(base["median_ms"] / ours["median_ms"])
            assert ours["x_floor"] == pytest.approx(ours["median_ms"] / floor["median_ms"])
    assert rec["targets"] == [] and rec["dispatch_rows"] == []  # smoke: nothing judged; the table is GPU-only


def test_lora_linear_cpu_target_is_judged_and_gpu_targets_need_every_shape():
    """The CPU target is judged at its shape; on a GPU the geometric mean, the worst shape and the forward's
    distance to the floor are (synthetic rows: judge() only reads them)."""
    from benchmarks import bench_lora_linear as b
    from rlhf_fast.benchmarking.harness import compare

    def rows(shape, peft_ms, auto_ms, fwd_auto=1.1, fwd_floor=1.0):
        n, i, o, r = shape
        fb = dict(n=n, d_in=i, d_out=o, r=r, group=f"fwdbwd {shape}", pass_="fwdbwd")
        fwd = dict(fb, group=f"fwd {shape}", pass_="fwd")
        return [dict(fb, impl="eager_peft", median_ms=peft_ms, baseline=True), dict(fb, impl="auto", median_ms=auto_ms),
                dict(fwd, impl="plain_linear", median_ms=fwd_floor, floor=True),
                dict(fwd, impl="auto", median_ms=fwd_auto)]

    cpu = b.judge(compare(rows(b.CPU_SHAPE, 1.5, 1.0)), on_cuda=False)
    assert [t["met"] for t in cpu] == [True] and cpu[0]["value"] == pytest.approx(1.5)
    gpu = b.judge(compare(rows((4096, 1600, 4800, 8), 2.0, 1.0) + rows((4096, 1600, 6400, 8), 0.95, 1.0)), True)
    assert [t["met"] for t in gpu] == [True, False, True]  # mean sqrt(2 * 0.95) >= 1.3; worst 0.95 < 1.0
    assert gpu[0]["value"] == pytest.approx((2.0 * 0.95) ** 0.5)
    slow_fwd = b.judge(compare(rows((4096, 1600, 4800, 8), 2.0, 1.0, fwd_auto=1.2)), True)
    assert slow_fwd[-1]["met"] is False


def test_attention_rows_compare_every_method_to_the_triton_kernel(tmp_path):
    from benchmarks import bench_attention

    assert bench_attention.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    rec = _record(tmp_path, "attention-cpu-*.json")
    train = [r for r in rec["rows"] if "T" in r]  # decode rows have T_max
    ours = [r for r in train if r["method"] == "triton"]
    assert ours and all(r["vs_triton"] == 1.0 for r in ours)
    baseline = [r for r in train if r["method"] == "sdpa_mask"]
    assert len(baseline) == len(ours) and all(_ratio(r["vs_triton"]) and _ratio(r["fwd_vs_triton"]) for r in baseline)
    assert all(r.get("note") for r in train if "fwd_ms" not in r)  # a missing baseline says why
    decode = [r for r in rec["rows"] if "GBps" in r]
    assert {r["method"] for r in decode} == {"triton", "triton_1split", "sdpa_mask"}
    assert _ratio(rec["copy_bandwidth_GBps"])
    assert rec["targets"] == [] and rec["dispatch_rows"] == []  # smoke: not the target shape; the table is GPU-only


def test_attention_targets_and_dispatch_rows_from_a_gpu_like_record(monkeypatch):
    from benchmarks import bench_attention as b
    from rlhf_fast.kernels import launch

    monkeypatch.setattr(launch, "arch", lambda device: 89)
    monkeypatch.setattr(launch, "num_sms", lambda device: 76)
    train = [dict(T=512, H=25, method="triton", fwdbwd_ms=1.0, vs_triton=1.0),
             dict(T=512, H=25, method="sdpa_mask", fwdbwd_ms=1.3, vs_triton=1.3),
             dict(T=512, H=25, method="flex", fwdbwd_ms=0.9, vs_triton=0.9),
             dict(T=512, H=25, method="flash_varlen", note="n/a on this device")]
    decode = [dict(H=25, T_max=1024, method="triton", us=30.0), dict(H=25, T_max=1024, method="sdpa_mask", us=20.0)]
    assert [(t["what"].split(" vs ")[1], t["met"]) for t in b.judge(train, True)] == [
        ("sdpa_mask (T=512, H=25)", True), ("flex (T=512, H=25)", False), ("flash_varlen (T=512, H=25)", None)]
    env = dict(device="NVIDIA GeForce RTX 4080", torch="2.13", triton="3.9", commit="abc")
    rows = b.dispatch_rows(train, decode, env, "cuda", torch.bfloat16)
    assert [(r["key"], r["winner"]) for r in rows] == [("sm89x76|bfloat16|h25|d64|q512k512|pad", "triton"),
                                                       ("sm89x76|bfloat16|h25|d64|q1k1024|pad", "torch")]


def test_ppo_kernels_against_the_loop_and_eager_baselines(tmp_path, no_compile):
    from benchmarks import bench_ppo

    assert bench_ppo.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    rec = _record(tmp_path, "ppo-cpu-*.json")
    rows = {r["bench"]: r for r in rec["rows"]}
    assert set(rows) == {"gae", "ppo_loss fwd+bwd"}
    gae, loss = rows["gae"], rows["ppo_loss fwd+bwd"]
    assert gae["x_loop"] == pytest.approx(gae["loop_ms"] / gae["triton_ms"]) and _ratio(gae["x_compiled"])
    assert loss["x_eager"] == pytest.approx(loss["eager_ms"] / loss["triton_ms"]) and _ratio(loss["x_compiled"])
    assert rec["interpreter"] is True and rec["targets"] == []  # B=256, T=512 targets: not at smoke sizes


def test_generation_against_hf_static_and_the_no_kv_cache_baseline(tmp_path):
    from benchmarks import bench_generation

    args = ["--smoke", "--impl", "eager", "--impl", "cuda_graph", "--impl", "hf_static", "--impl", "nocache"]
    assert bench_generation.main([*args, "--out-dir", str(tmp_path)]) == 0
    rec = _record(tmp_path, "generation-cpu-*.json")
    eager, graph, hf, nocache = rows = rec["rows"]
    assert [r["key"] for r in rows] == ["eager", "cuda_graph", "hf_static", "nocache"]
    assert all((r["preset"], r["B"], r["P"], r["N"]) == ("tiny", 2, 8, 4) for r in rows)
    assert graph["status"] == "skipped (CUDA graphs need CUDA)"
    assert hf["impl"] == "hf generate (static cache, eager)"  # HF compiles its decode forward on CUDA only
    for r in (eager, hf, nocache):
        assert r["status"] == "ok" and _ratio(r["tokens_per_s"]) and _ratio(r["first_call_s"])
        assert r["x_vs_ours_eager"] == pytest.approx(r["seconds"] / eager["seconds"])
    assert eager["step_over_floor"] == pytest.approx(eager["step_ms"] / eager["floor_ms"])
    targets = {t["name"]: t for t in rec["targets"]}
    assert set(targets) == {"x_hf_static", "x_nocache", "step_over_floor"}
    assert targets["x_nocache"]["value"] == pytest.approx(nocache["seconds"] / eager["seconds"])
    assert targets["x_nocache"]["target"] == ">= 30" and all(t["met"] is None for t in targets.values())


def test_generation_targets_are_judged_on_cuda_against_compiled_hf_only():
    from rlhf_fast.benchmarking.generation_bench import generation_targets

    rows = [{"key": "eager", "impl": "ours eager", "seconds": 2.0, "step_ms": 3.0},
            {"key": "cuda_graph", "impl": "ours CUDA graph", "seconds": 1.0, "step_ms": 1.0},
            {"key": "hf_static", "impl": "hf generate (static cache + compile)", "seconds": 1.5},
            {"key": "nocache", "impl": "no-KV-cache loop (seed)", "seconds": 40.0}]
    judged = {t["name"]: t for t in generation_targets(rows, floor_s=0.4e-3, on_gpu=True)}
    assert judged["x_hf_static"]["value"] == 1.5 and judged["x_hf_static"]["met"] is False  # ours = the CUDA graph
    assert judged["x_nocache"]["value"] == 40.0 and judged["x_nocache"]["met"] is True
    assert judged["step_over_floor"]["value"] == pytest.approx(2.5) and judged["step_over_floor"]["met"] is False
    rows[2]["impl"] = "hf generate (static cache, eager)"
    assert {t["name"]: t for t in generation_targets(rows, 0.4e-3, True)}["x_hf_static"]["met"] is None


def test_train_step_compiled_rows_against_their_eager_baseline(tmp_path, no_compile):
    from benchmarks import bench_train_step

    assert bench_train_step.main(["--smoke", "--compile", "--out-dir", str(tmp_path)]) == 0
    rows = _record(tmp_path, "train_step-cpu-*.json")["rows"]
    assert {(r["stage"], r["mode"], r["compile"]) for r in rows} == {
        (s, m, c) for s in ("sft", "rm") for m in ("lora", "full") for c in (False, True)}
    by = {(r["group"], r["compile"]): r for r in rows}
    for (group, compiled), r in by.items():
        base = by[group, False]
        assert r["baseline"] is not compiled and _ratio(r["tokens_per_s"])
        assert r["speedup_vs_baseline"] == pytest.approx(base["median_ms"] / r["median_ms"])


def test_memory_16gb_lora_xl_runs_the_real_trainer(tmp_path):
    from benchmarks import bench_memory_16gb

    assert bench_memory_16gb.main(["--smoke", "--config", "lora-xl", "--iters", "1", "--out-dir", str(tmp_path)]) == 0
    rec = _record(tmp_path, "memory_16gb-smoke-cpu-*.json")
    (row,) = rec["rows"]
    assert row["status"] == "ok" and row["config"] == "lora-xl" and row["model"] == "tiny", row
    for k in ("iter_s", "generate_s", "score_s", "train_s", "peak_experience_gib", "peak_iter_gib",
              "predicted_peak_gib", "predicted_experience_gib", "predicted_update_gib", "peak_vs_plan"):
        assert _ratio(row[k]), (k, row[k])
    assert row["peak_vs_plan"] == pytest.approx(row["peak_iter_gib"] / row["predicted_peak_gib"])
    assert row["plan_fits"] and row["plan_micro_batch"] == 2 and row["plan_grad_checkpoint"] is False
    assert rec["comparison"] == {"offload_peak_saving_x": None, "offload_time_x": None}  # no baseline row run


@pytest.mark.slow
def test_memory_16gb_every_configuration_with_the_baseline(tmp_path):
    """The three configurations, each in its own subprocess (DeepSpeed's CPU accelerator for the full ones)."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed (pip install 'rlhf_fast[deepspeed]')")
    from benchmarks import bench_memory_16gb

    assert bench_memory_16gb.main(["--smoke", "--iters", "1", "--out-dir", str(tmp_path)]) == 0
    rec = _record(tmp_path, "memory_16gb-smoke-cpu-*.json")
    rows = {r["config"]: r for r in rec["rows"]}
    assert list(rows) == list(bench_memory_16gb.CONFIGS)
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["full-large-gpu"]["baseline"] and not rows["full-large-offload"]["baseline"]
    comparison = rec["comparison"]
    assert comparison["offload_peak_saving_x"] == pytest.approx(
        rows["full-large-gpu"]["peak_iter_gib"] / rows["full-large-offload"]["peak_iter_gib"])
    assert comparison["offload_time_x"] == pytest.approx(
        rows["full-large-offload"]["iter_s"] / rows["full-large-gpu"]["iter_s"])


def test_suites_refuse_gpu_sizes_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    from benchmarks import bench_attention, bench_lora_linear, bench_memory_16gb

    with pytest.raises(SystemExit) as e:
        bench_memory_16gb.main([])
    assert e.value.code == 2 and "--smoke" in capsys.readouterr().err
    for module in (bench_lora_linear, bench_attention):  # the dispatch table holds GPU measurements only
        with pytest.raises(SystemExit) as e:
            module.main(["--write-dispatch"])
        assert e.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_rl_algorithms_every_option_from_the_same_start(tmp_path):
    from benchmarks import rl_algorithms

    assert rl_algorithms.main(["--smoke", "--task", "arithmetic", "--out-dir", str(tmp_path)]) == 0
    rows = _record(tmp_path, "rl_algorithms-smoke-cpu-*.json")["rows"]
    assert [r["option"] for r in rows] == list(rl_algorithms.ARITHMETIC)
    assert len({r["reward_before"] for r in rows if r["option"] != "dapo"}) == 1  # one starting policy
    assert all(r["iterations"] == 1 and math.isfinite(r["reward_after"]) for r in rows)


def test_hh_rm_probe_needs_a_data_file_and_scores_every_rule(tmp_path, capsys):
    from benchmarks import hh_rm_probe

    with pytest.raises(SystemExit) as e:
        hh_rm_probe.main(["--smoke"])
    assert e.value.code == 2 and "--data PATH" in capsys.readouterr().err
    data = tmp_path / "hh.jsonl"
    with open(data, "w") as f:
        for i in range(60):
            turn = f"\n\nHuman: question {i}?\n\nAssistant:"
            pair = {"chosen": turn + " a short kind answer", "rejected": turn + " no" * (1 + i % 7)}
            f.write(json.dumps(pair) + "\n")
    out = tmp_path / "out"
    assert hh_rm_probe.main(["--smoke", "--data", str(data), "--tokenizer", "byte", "--preset", "tiny",
                             "--out-dir", str(out)]) == 0
    rec = _record(out, "hh_rm_probe-cpu-*.json")
    methods = [r["method"] for r in rec["rows"]]
    assert methods[:4] == ["chance", "shorter reply wins", "longer reply wins", "kept EOS wins (old rule)"]
    assert methods[4].startswith("RM")
    assert rec["pairs"]["held_out"] == 16 and all(0 <= r["accuracy"] <= 1 for r in rec["rows"])


def test_dispatch_table_merges_a_gpu_runs_rows_and_refuses_cpu_ones(tmp_path, capsys):
    """`python -m benchmarks.dispatch_table --merge`: a gpu_check directory's dispatch_rows.json and suite records
    with "dispatch_rows" go into the table, replacing rows of the same key; a row without a GPU is refused."""
    from benchmarks import dispatch_table

    def row(key, winner, device="NVIDIA H100 80GB HBM3"):
        return dict(kernel="lora_linear", key=key, winner=winner, ms={"torch": 1.0, "triton": 2.0}, device=device)

    table = tmp_path / "table.json"
    table.write_text(json.dumps({"rows": [row("sm90x132|bfloat16|1600|4800|r8|t4096", "triton")]}))
    run = tmp_path / "gpu_check-x"
    run.mkdir()
    (run / "dispatch_rows.json").write_text(json.dumps({"rows": [row("sm90x132|bfloat16|1600|4800|r8|t4096",
                                                                      "torch")]}))
    (run / "kernel_benchmarks.json").write_text(json.dumps({"bench_lora": {"rows": [], "dispatch_rows": [
        row("sm90x132|bfloat16|6400|1600|r16|t4096", "torch")]}}))
    (run / "summary.json").write_text(json.dumps({"overall": "PASS"}))
    assert dispatch_table.main(["--merge", str(run), "--table", str(table)]) == 0
    rows = json.loads(table.read_text())["rows"]
    assert [(r["key"].split("|")[2], r["winner"]) for r in rows] == [("1600", "torch"), ("6400", "torch")]
    assert "merged 2 row(s)" in capsys.readouterr().out
    bad = tmp_path / "cpu.json"
    bad.write_text(json.dumps({"dispatch_rows": [row("cpu|float32|1|1|r8|t256", "torch", device="cpu")]}))
    with pytest.raises(SystemExit, match="not a GPU dispatch row"):
        dispatch_table.main(["--merge", str(bad), "--table", str(table)])


def test_compile_bench_times_both_modes_in_fresh_processes_and_counts_recompiles(tmp_path):
    from benchmarks import bench_compile

    assert bench_compile.main(["--smoke", "--backend", "eager", "--iters", "2", "--out-dir", str(tmp_path)]) == 0
    rec = _record(tmp_path, "compile-cpu-*.json")
    cold = {r["mode"]: r for r in rec["rows"] if r["section"] == "cold"}
    assert set(cold) == {"whole", "regional"} and all(r["compile_s"] > 0 for r in cold.values())
    whole, regional = cold["whole"]["compile_s"], cold["regional"]["compile_s"]
    assert cold["regional"]["speedup_vs_whole"] == pytest.approx(whole / regional)
    runs = [r for r in rec["rows"] if r["section"] == "recompiles"]
    assert [r["iteration"] for r in runs] == [1, 2] and runs[0]["compiles"] == rec["variants"] >= 1
    assert runs[1]["compiles"] == 0 and runs[1]["compile_graphs"] == runs[0]["compile_graphs"]
    speed, recompiles = rec["targets"]
    assert speed["met"] is None and recompiles["met"] is True  # smoke: the speed-up is not judged
