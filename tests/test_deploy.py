"""The device artifacts: integer packing, the integer weight file, the self-contained exported program, the
like-for-like cost rows (the teacher's own ONNX model as the in-runtime baseline, interleaved timing), the
compression benchmark."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, handmade_student
from models import Generator
from models.quant import quantize_weight
from utils.compression import deploy
from utils.compression.compress import compress
from utils.compression import cost, runtime
from utils.compression.cost import SAME_RUNTIME, TEACHER, TEACHER_RUNTIME, add_ratios, count_parameters, format_table


def random_ints(n, low, high, seed=0):
    return torch.randint(low, high + 1, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 1001])
def test_int4_round_trip_is_exact(n):
    values = random_ints(n, -8, 7, seed=n)
    packed = deploy.pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(deploy.unpack_int4(packed, n).to(torch.int64), values)


def test_int4_extremes_and_shape():
    values = torch.tensor([[-8, 7, 0], [-1, 1, -7]])
    entry = {"encoding": "int4", "data": deploy.pack_int4(values), "shape": [2, 3]}
    assert torch.equal(deploy.decode_ints(entry).to(torch.int64), values)


def test_int4_rejects_out_of_range_and_bad_lengths():
    with pytest.raises(ValueError):
        deploy.pack_int4(torch.tensor([8]))
    with pytest.raises(ValueError):
        deploy.pack_int4(torch.tensor([-9]))
    with pytest.raises(ValueError):
        deploy.unpack_int4(torch.zeros(3, dtype=torch.uint8), 7)


@pytest.mark.parametrize("bits,dtype", [(8, torch.int8), (6, torch.int8), (16, torch.int16), (4, torch.uint8),
                                        (2, torch.uint8)])
def test_integer_encodings_round_trip(bits, dtype):
    qmax = 2 ** (bits - 1) - 1
    values = random_ints(2 * 3 * 5 * 7, -qmax, qmax, seed=bits).view(2, 3, 5, 7)
    data = deploy.encode_ints(values.float(), bits)
    assert data.dtype == dtype
    entry = {"encoding": deploy.encoding_for(bits), "data": data, "shape": list(values.shape)}
    assert torch.equal(deploy.decode_ints(entry).to(torch.int64), values)


# ---------------------------------------------------------------- the integer artifact

@pytest.mark.parametrize("bits", [8, 4, 3, 32])
def test_artifact_reloads_an_identical_generator(tmp_path, bits):
    compact = compress(handmade_student(bits=bits, dead=([0, 3], [1], [2, 4])))
    path = str(tmp_path / deploy.ARTIFACT_NAME)
    deploy.save_artifact(compact, path)
    raw = torch.load(path, weights_only=True)
    for name, entry in raw["quantized"].items():  # real integers on disk
        assert entry["data"].dtype == (torch.uint8 if bits <= 4 else torch.int8), name
    assert (len(raw["quantized"]) == 4) == (bits < 32)
    loaded = deploy.load_artifact(path)
    assert loaded.model_args() == compact.model_args() and not loaded.training
    for name, conv in deploy.quant_convs(compact).items():  # int * scale == the eval-mode fake-quant weight
        other = dict(loaded.named_modules())[name]
        assert torch.equal(other.weight_scale, conv.weight_scale)
        expected = conv.weight if bits == 32 else quantize_weight(conv.weight, conv.weight_scale, bits, conv.out_dim)
        assert torch.equal(other.quantized_weight(), expected)
    z, labels = compact.sample_inputs(300, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(z, labels), compact(z, labels))  # bit-identical


def test_artifact_rejects_foreign_files(tmp_path):
    path = str(tmp_path / "x.pt")
    torch.save({"generator": {}}, path)
    with pytest.raises(ValueError, match="not an integer generator artifact"):
        deploy.load_artifact(path)


@pytest.mark.parametrize("channels,bits", [((12, 8, 6), 8), ((64, 32, 16), 8), ((64, 32, 16), 4), ((9, 5, 3), 3)])
def test_artifact_size_is_bits_over_8_per_weight(tmp_path, channels, bits):
    generator = Generator(channels=channels, bits=bits).eval()
    size = deploy.save_artifact(generator, str(tmp_path / "a.pt"))
    conv_weights = sum(conv.weight.numel() for conv in deploy.quant_convs(generator).values())
    other = sum(v.numel() * v.element_size() for k, v in generator.state_dict().items()
                if not (k.endswith(".weight") and k[:-len(".weight")] in deploy.quant_convs(generator)))
    payload = (conv_weights * deploy.stored_bits(bits) + 7) // 8 + other
    assert deploy.payload_bytes(generator) == payload
    overhead = 400 * len(generator.state_dict()) + 2048  # zip records and pickled names only
    assert payload <= size <= payload + overhead
    if conv_weights > 100_000:  # then ~ parameters x bits / 8: the float extras (BatchNorm, scales) are small
        assert size <= 1.03 * count_parameters(generator) * deploy.stored_bits(bits) / 8 + overhead


def test_int4_artifact_is_half_the_int8_one(tmp_path):
    sizes = {bits: deploy.save_artifact(Generator(channels=(64, 32, 16), bits=bits), str(tmp_path / f"{bits}.pt"))
             for bits in (4, 8)}
    assert 0.49 < sizes[4] / sizes[8] < 0.53


# ---------------------------------------------------------------- the exported program

def test_folded_model_equals_compact():
    compact = compress(handmade_student(bits=4, dead=([1], [2, 3], [0])))
    z, labels = compact.sample_inputs(64)
    with torch.no_grad():
        assert torch.equal(deploy.folded(compact)(z, labels), compact(z, labels))
    assert compact.block0.conv.bits == 4  # the original is untouched


LOADER = textwrap.dedent("""
    import sys, torch
    assert not any(p and __import__("os").path.exists(__import__("os").path.join(p, "models", "generator.py"))
                   for p in sys.path), sys.path
    try:
        import models  # noqa: F401
        raise SystemExit("the repository is importable")
    except ImportError:
        pass
    module = torch.export.load("generator.pt2").module()
    inputs = torch.load("inputs.pt", weights_only=True)
    outputs = [module(z, labels) for z, labels in inputs]
    torch.save(outputs, "outputs.pt")
    print("ok", [tuple(o.shape) for o in outputs])
""")


def test_exported_program_runs_without_the_repository(tmp_path):
    compact = compress(handmade_student(bits=8, dead=([0, 3, 5], [1], [0, 1, 2, 3, 4])))
    deploy.export_program(compact, str(tmp_path / deploy.PROGRAM_NAME))
    inputs = [compact.sample_inputs(n, generator=torch.Generator().manual_seed(n)) for n in (1, 5, 64)]
    torch.save(inputs, str(tmp_path / "inputs.pt"))
    (tmp_path / "loader.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "loader.py"], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    outputs = torch.load(str(tmp_path / "outputs.pt"), weights_only=True)
    with torch.no_grad():
        for (z, labels), output in zip(inputs, outputs):
            assert output.shape == (len(z), 1, 28, 28)
            assert (output - compact(z, labels)).abs().max().item() <= 1e-6


# ---------------------------------------------------------------- report helpers and the benchmark

def test_ratios_and_table():
    rows = add_ratios({"teacher": {"parameters": 100, "bytes": 400, "images_per_s": 10.0},
                       "compact": {"parameters": 25, "bytes": 20, "images_per_s": 45.0}})
    assert rows["compact"]["vs_teacher"] == {"parameters": 0.25, "bytes": 0.05, "images_per_s": 4.5}
    table = format_table(rows)
    assert "compact" in table and "0.05" in table and "4.5" in table


# ---------------------------------------------------------------- like for like (issue 26)

def test_teacher_baseline_is_the_teachers_own_graph(tmp_path):
    """The in-runtime baseline of every ratio is the teacher's own float graph: ONNX Runtime computes the eager
    teacher within float tolerance (on inputs other than the ones its own check used), and not another teacher."""
    teacher = handmade_student(channels=(12, 8, 6), bits=32)
    baseline = runtime.teacher_baseline(teacher, str(tmp_path))
    assert baseline["max_abs_diff_to_eager"] <= runtime.BASELINE_TOLERANCE
    assert baseline["bytes"] == os.path.getsize(baseline["path"])
    z, labels = teacher.sample_inputs(32, generator=torch.Generator().manual_seed(7))
    images = runtime.runtime_forward(baseline["path"], threads=1)(z, labels)
    with torch.no_grad():
        assert (images - teacher(z, labels)).abs().max() <= runtime.BASELINE_TOLERANCE
        other = handmade_student(channels=(12, 8, 6), bits=32, seed=1)  # the check can fail
        assert (images - other(z, labels)).abs().max() > 100 * runtime.BASELINE_TOLERANCE


def test_teacher_baseline_refuses_a_graph_that_is_not_the_teacher(tmp_path, monkeypatch):
    teacher, other = (handmade_student(channels=(12, 8, 6), bits=32, seed=seed) for seed in (0, 1))
    write = runtime.save_runtime_artifact
    monkeypatch.setattr(runtime, "save_runtime_artifact", lambda model, path, program=None: write(other, path))
    with pytest.raises(RuntimeError, match="differs from the eager teacher"):
        runtime.teacher_baseline(teacher, str(tmp_path))


def test_like_for_like_rows_ratio_to_the_teacher_in_the_same_runtime(tmp_path):
    teacher = handmade_student(channels=(12, 8, 6), bits=32)
    compact = compress(handmade_student(bits=8, dead=([0, 3], [1], [2, 4])))
    path = str(tmp_path / "g.onnx")
    runtime.save_runtime_artifact(compact, path)
    speed = {"latency_repeats": 2, "throughput_repeats": 2, "throughput_batch": 4}
    rows = deploy.like_for_like_rows(teacher, {"compact (ONNX Runtime)": deploy.runtime_entry(compact, path),
                                               "compact (eager)": (compact, deploy.folded(compact), 1000)}, speed)
    assert list(rows) == [TEACHER, TEACHER_RUNTIME, "compact (ONNX Runtime)", "compact (eager)"]
    assert rows[TEACHER_RUNTIME]["max_abs_diff_to_eager"] <= runtime.BASELINE_TOLERANCE
    shipped, eager = rows["compact (ONNX Runtime)"], rows["compact (eager)"]
    for key in ("bytes", "latency_ms", "images_per_s"):
        assert shipped[SAME_RUNTIME][key] == shipped[key] / rows[TEACHER_RUNTIME][key]  # like for like
        assert shipped["vs_teacher"][key] == shipped[key] / rows[TEACHER][key]  # the labelled second column
        assert eager[SAME_RUNTIME][key] == eager["vs_teacher"][key] == eager[key] / rows[TEACHER][key]
    assert {row["threads"] for row in rows.values()} == {torch.get_num_threads()}
    assert "x eager T" in format_table(rows)


def test_interleaved_speed_times_the_runs_in_turn(monkeypatch):
    """Every round times each run in turn, in a burst after an untimed call (the warm-ups in the first round), and
    each figure is the median of its run's timed calls; a fake clock that each call advances by its run's cost
    makes the figures exact."""
    clock, calls = [0.0], []

    def run_costing(name, seconds):
        def run(z, labels):
            calls.append((name, len(z)))
            clock[0] += seconds * len(z)
        return run
    monkeypatch.setattr(cost.time, "perf_counter", lambda: clock[0])
    model = Generator(nz=4, channels=(2, 2, 2))
    runs = {"a": (model, run_costing("a", 1.0)), "b": (model, run_costing("b", 3.0))}
    monkeypatch.setattr(cost, "ROUNDS", 2)
    speed = cost.interleaved_speed(runs, latency_repeats=4, throughput_repeats=2, throughput_batch=4, warmup=1)
    latency_round, throughput_round = [("a", 1)] * 3 + [("b", 1)] * 3, [("a", 4)] * 2 + [("b", 4)] * 2
    assert calls == latency_round * 2 + throughput_round * 2
    assert speed == {"a": {"latency_ms": 1000.0, "images_per_s": 1.0},
                     "b": {"latency_ms": 3000.0, "images_per_s": 1 / 3}}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_compression",
                                                  os.path.join(ROOT, "benchmarks", "bench_compression.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_synthetic_widths(tmp_path, capsys):
    bench = load_bench()
    path = bench.main(bench.parse_args(
        ["--synthetic-widths", "6", "4", "2", "--teacher-widths", "12", "8", "4", "--nz", "16", "--bits", "4",
         "--latency-repeats", "1", "--throughput-repeats", "1", "--throughput-batch", "4",
         "--results-dir", str(tmp_path)]))
    result = json.load(open(path))
    assert result["compact_widths"] == [6, 4, 2] and result["teacher_widths"] == [12, 8, 4]
    assert set(result["cost"]) == {"teacher", "teacher (ONNX Runtime)", "compact (ONNX Runtime)", "compact (eager)",
                                   "compact (pt2, float debug export)"}
    runtime_row, teacher_row = result["cost"]["compact (ONNX Runtime)"], result["cost"][TEACHER_RUNTIME]
    # the goals are judged like for like: against the teacher's ONNX model in the same runtime
    assert result["goals"]["bytes"]["ratio"] == runtime_row["bytes"] / teacher_row["bytes"] < 1
    assert result["goals"]["images_per_s"]["ratio"] == runtime_row["images_per_s"] / teacher_row["images_per_s"]
    assert result["goals"]["latency_ms"]["ratio"] == runtime_row["latency_ms"] / teacher_row["latency_ms"]
    assert "goal <=" in capsys.readouterr().out


def test_benchmark_on_a_compact_run(handmade_pipeline, tmp_path, no_figures):
    import compress_student
    out = handmade_pipeline[0]
    compress_student.main(compress_student.parse_args(
        ["--out", out, "--check-samples", "64", "--latency-repeats", "1", "--throughput-repeats", "1",
         "--throughput-batch", "4"]))
    bench = load_bench()
    path = bench.main(bench.parse_args(["--out", out, "--latency-repeats", "1", "--throughput-repeats", "1",
                                        "--throughput-batch", "4", "--results-dir", str(tmp_path)]))
    result = json.load(open(path))
    assert result["source"]["teacher"].startswith("teacher run")
    assert result["compact_widths"] == [9, 7, 1]


def test_pareto_front_of_the_sweep():
    bench = load_bench()
    base = {"bytes": 100, "latency_ms": 1.0, "images_per_s": 10.0, "fd": 20.0, "downstream_accuracy": 0.7}
    rows = [dict(base), {**base, "bytes": 50}, {**base, "bytes": 50, "fd": 30.0}, {**base, "bytes": 200, "fd": 10.0},
            {**base, "bytes": 200, "fd": 25.0}]
    assert bench.pareto_flags(rows) == [False, True, False, True, False]


def test_sweep_writes_a_pareto_table_from_one_teacher_and_distillation_set(tiny_distill_run, tiny_data_root,
                                                                            tmp_path):
    from conftest import TINY_PUBLIC
    from utils.run.checkpoint import lineage, load_checkpoint
    out, distill_dir = tiny_distill_run
    teacher_dir = lineage(load_checkpoint(distill_dir, "distill"))["teacher"]
    bench = load_bench()
    argv = ["--sweep", "--out", out, "--teacher-dir", teacher_dir, "--distill-dir", distill_dir, "--rhos", "2.5",
            "--sweep-bits", "4", "--penalties", "uniform", "cost", "--student-steps", "3", "--student-batch-size",
            "16", "--num-fd-samples", "100", "--num-downstream-samples", "200", "--classifier-epochs", "1",
            "--data-root", tiny_data_root, "--public-size", str(TINY_PUBLIC), "--audit-samples", "100",
            "--audit-members", "50", "--max-steps", "5", "--latency-repeats", "1", "--throughput-repeats", "1",
            "--throughput-batch", "4", "--results-dir", str(tmp_path / "results"),
            "--sweep-out", str(tmp_path / "sweep"), "--device", "cpu"]
    path = bench.main(bench.parse_args(argv))
    check_reuse(bench, argv, str(tmp_path / "sweep"))
    result = json.load(open(path))
    points = result["points"]
    assert [(p["rho"], p["bits"], p["penalty"]) for p in points] == [(2.5, 4, "uniform"), (2.5, 4, "cost")]
    for point in points:
        assert point["bytes"] == os.path.getsize(os.path.join(point["run_dir"], "generator.onnx"))
        assert point["vs_teacher"]["bytes"] == point["bytes"] / result["teacher"]["bytes"]
        for key in ("bytes", "latency_ms", "images_per_s"):  # the headline: the teacher in the same runtime
            assert point[SAME_RUNTIME][key] == point[key] / result["teacher_runtime"][key]
        assert math.isfinite(point["fd"]) and 0 <= point["downstream_accuracy"] <= 1
    assert any(point["pareto"] for point in points)
    assert os.path.getsize(path.replace(".json", ".png")) > 0
    table = open(path.replace(".json", ".md")).read()
    assert "rho2.5-4bit-cost" in table and "Pareto" in table


def check_reuse(bench, argv, sweep_root):
    """--reuse takes a point's finished runs as they are (nothing trained), and refuses runs of other settings."""
    from utils.run.cli import UserError
    args = bench.parse_args([*argv, "--reuse"])
    before = {stage: sorted(os.listdir(os.path.join(sweep_root, stage))) for stage in ("student", "compact")}
    point = bench.SweepPoint(2.5, 4, "cost")
    compact = bench.train_point(args, point, sweep_root)
    assert os.path.basename(compact) in before["compact"] and compact.endswith("-" + point.name)
    assert before == {stage: sorted(os.listdir(os.path.join(sweep_root, stage))) for stage in ("student", "compact")}
    link = os.path.join(os.path.dirname(sweep_root), "distill-latest")  # as make pipeline's runs are named
    os.symlink(os.path.realpath(args.distill_dir), link)
    args.distill_dir = link
    assert bench.train_point(args, point, sweep_root) == compact
    args.student_steps = 4
    with pytest.raises(UserError, match="other settings"):
        bench.train_point(args, point, sweep_root)
