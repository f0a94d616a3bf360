"""The on-device artifact (generator.onnx run by ONNX Runtime) and the cost-weighted channel penalty."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto

from conftest import ROOT, handmade_student
from models import Generator
from utils.compression import runtime
from utils.compression.compress import compress
from utils.compression.reference import reference_images
from utils.compression.cost import count_macs, count_parameters
from utils.compression.slimming import ChannelCost, channel_costs, gamma_parameters, layer_costs, proximal_step

RUNNER = os.path.join(ROOT, "utils", "compression", "ort_runner.py")


def compact_model(bits):
    """A compact generator with calibrated BatchNorm statistics, random gamma/beta and dead channels removed."""
    return compress(handmade_student(channels=(12, 8, 6), bits=bits, dead=([0, 3], [1], [2, 4])))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """{bits: (compact model, path of its generator.onnx)}"""
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for bits in (8, 4, 32):
        model = compact_model(bits)
        path = str(folder / f"g{bits}.onnx")
        runtime.save_runtime_artifact(model, path)
        out[bits] = model, path
    return out


def test_subpixel_rewrite_is_the_transposed_conv():
    torch.manual_seed(0)
    weight, x = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 7, 7, dtype=torch.float64)
    expected = F.conv_transpose2d(x, weight, stride=2, padding=1)
    phases = F.conv2d(x, torch.from_numpy(runtime.subpixel_kernel(weight.numpy())), padding=1)
    n, c4, h, w = phases.shape  # DepthToSpace, DCR mode, then the one-pixel crop
    y = phases.view(n, 2, 2, c4 // 4, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c4 // 4, 2 * h, 2 * w)
    assert torch.allclose(y[:, :, 1:-1, 1:-1], expected, atol=1e-12)


@pytest.mark.parametrize("bits", [8, 4, 32])
def test_artifact_matches_the_compact_model(artifacts, bits):
    model, path = artifacts[bits]
    result = runtime.verify_runtime(model, path, runtime.VerifySettings(num_samples=512))
    assert result["ok"] and result["max_abs_diff"] <= runtime.TOLERANCE
    assert result["exact"] is (None if bits == 32 else True)  # bit for bit its integer reference
    if bits == 32:  # float arithmetic in another order only
        assert result["max_abs_diff"] < 1e-4


def test_verify_catches_a_different_model(artifacts):
    model, _ = artifacts[8]
    _, other_path = artifacts[4]
    assert not runtime.verify_runtime(model, other_path, runtime.VerifySettings(num_samples=64))["ok"]


def test_judge_lets_rare_flips_pass_and_refuses_a_systematic_or_widespread_difference():
    settings = runtime.VerifySettings()
    diff = np.full((100, 1, 10, 10), 1e-4)  # 10,000 pixels
    assert runtime.judge(diff, settings)["ok"]
    allowed = round(runtime.PIXEL_SHARE * diff.size)
    diff.flat[:allowed] = 0.08  # the allowed share of the pixels one rounding step off
    verdict = runtime.judge(diff, settings)
    assert verdict["ok"] and verdict["pixels_over_tolerance"] == allowed and verdict["max_abs_diff"] == 0.08
    diff.flat[allowed] = 0.08  # one more pixel than the share allows
    assert not runtime.judge(diff, settings)["ok"]
    assert not runtime.judge(np.full((4, 1, 2, 2), 2 * runtime.MEAN_TOLERANCE), settings)["ok"]  # all a little off
    assert not runtime.judge(np.array([0.0, np.nan]), settings)["ok"]


def test_verify_refuses_an_artifact_whose_output_bias_is_off(artifacts, tmp_path):
    """A small systematic error of the integer program (to_image's bias off by 0.01: every pixel moves by about
    that), which the graph and the integer reference share, so that they still agree bit for bit, is caught by the
    layer check (to_image against the model's on the same input), though no image is off by more than TOLERANCE."""
    model, _ = artifacts[8]
    program = runtime.lower(model)
    program.image.bias = program.image.bias + np.float32(0.01)
    path = str(tmp_path / "shifted.onnx")
    runtime.save_runtime_artifact(model, path, program)
    verdict = runtime.verify_runtime(model, path, runtime.VerifySettings(num_samples=64), program)
    assert verdict["exact"] and not verdict["ok"] and verdict["pixels_over_tolerance"] == 0
    assert verdict["layer_check"]["image_max_abs_diff"] > verdict["layer_check"]["image_tolerance"]
    assert all(v["violations"] == 0 for v in verdict["layer_check"]["layers"].values())


def initializer_types(path) -> dict:
    model = onnx.load(path)
    return {init.name: (init.data_type, int(np.prod(init.dims))) for init in model.graph.initializer}, model


@pytest.mark.parametrize("bits,dtype", [(8, TensorProto.INT8), (4, TensorProto.INT4)])
def test_integer_weights_inside_and_only_blocks_0_and_to_image_in_float(artifacts, bits, dtype):
    model, path = artifacts[bits]
    types, proto = initializer_types(path)
    for layer in ("block0", "block1", "block2", "to_image"):
        assert types[f"{layer}.weight_int"][0] == dtype, layer
    float_values = sum(n for kind, n in types.values() if kind == TensorProto.FLOAT)
    assert float_values <= model.embed.weight.numel() + 8 * sum(model.channels) + 8  # scales, biases, steps
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("QLinearConv") == 2 and ops.count("ConvInteger") == 1 and ops.count("MatMulInteger") == 1
    assert not {"MatMul", "ConvTranspose", "Conv", "Tanh"} & set(ops)  # integer sums only, no float conv
    outputs = {op: [node.output[0] for node in proto.graph.node if node.op_type == op] for op in ("Div", "Round")}
    assert outputs == {"Div": ["images"], "Round": ["block0.grid"]}  # the tanh's; block0's input grid, no fake quant
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["float_layers"] == "block0,to_image" and meta["bits"] == str(bits) and meta["block0_sums"] == "limbs"


@pytest.mark.parametrize("bits", [8, 4])
def test_file_size_is_parameters_times_bits_plus_scales(tmp_path, bits):
    model = Generator(channels=(64, 32, 16), bits=bits).eval()
    size = runtime.save_runtime_artifact(model, str(tmp_path / "g.onnx"))
    weights = sum(conv.weight.numel() for conv in [b.conv for b in model.blocks()] + [model.to_image])
    assert weights > 0.97 * count_parameters(model)
    expected = runtime.expected_bytes(model)
    assert 0 <= size - expected < 0.02 * expected + 8_000, (size, expected)  # + the graph (about 8 kB)
    assert size < 0.3 * weights * 4 if bits == 8 else size < 0.16 * weights * 4  # vs float32


def run_runtime_only(args):
    """Run utils/compression/ort_runner.py in a fresh interpreter where importing torch fails."""
    code = ("import runpy, sys\nsys.modules['torch'] = None\nsys.argv = ['ort_runner.py'] + sys.argv[1:]\n"
            "runpy.run_path(%r, run_name='__main__')\n"
            "assert sys.modules.get('torch') is None\n" % RUNNER)
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bits", [8, 4])
def test_runtime_only_process_reproduces_the_compact_model(artifacts, tmp_path, bits):
    model, path = artifacts[bits]
    z, labels = model.sample_inputs(40, generator=torch.Generator().manual_seed(3))
    np.savez(tmp_path / "zy.npz", z=z.numpy(), labels=labels.numpy())
    report = run_runtime_only([path, "--inputs", str(tmp_path / "zy.npz"), "--out", str(tmp_path / "x.npy")])
    assert report["images_shape"] == [40, 1, 28, 28] and report["metadata"]["bits"] == str(bits)
    expected = reference_images(runtime.lower(model), z, labels).numpy()
    assert np.array_equal(np.load(tmp_path / "x.npy"), expected)  # bit for bit, without torch


def test_runner_samples_and_benchmarks_without_torch(artifacts):
    _, path = artifacts[8]
    report = run_runtime_only([path, "--num-samples", "5", "--bench"])
    assert report["images_shape"] == [5, 1, 28, 28] and -1 <= report["min"] <= report["max"] <= 1
    assert report["latency_ms"] > 0 and report["images_per_s"] > 0


def test_unsupported_bits_are_refused():
    with pytest.raises(ValueError, match="2-8 or 32"):
        runtime.build_onnx(Generator(channels=(4, 4, 4), bits=16))


def test_runtime_cost_reports_bytes_and_speed(artifacts):
    _, path = artifacts[8]
    row = runtime.runtime_cost(path, threads=1, speed={"latency_repeats": 2, "throughput_repeats": 1,
                                                       "throughput_batch": 8})
    assert row["bytes"] == os.path.getsize(path) and row["latency_ms"] > 0 and row["images_per_s"] > 0


# ---------------------------------------------------------------- cost-weighted channel penalty

@pytest.mark.parametrize("channels", [(256, 128, 64), (9, 5, 3)])
def test_layer_costs_are_what_removing_one_channel_saves(channels):
    full = Generator(nz=20, channels=channels)
    for i, (params, macs) in enumerate(layer_costs(full)):
        smaller = list(channels)
        smaller[i] -= 1
        small = Generator(nz=20, channels=smaller)
        assert params == count_parameters(full) - count_parameters(small)
        assert macs == count_macs(full) - count_macs(small)


def test_channel_costs_are_normalised_over_live_channels():
    G = Generator(nz=20, channels=(10, 6, 4))
    G.block1.norm.alive[:3] = False
    weights, live = channel_costs(G), G.active_channels()
    assert sum(w * n for w, n in zip(weights, live)) / sum(live) == pytest.approx(1.0)
    params_only = channel_costs(G, ChannelCost(params=1.0, macs=0.0))
    costs = layer_costs(G)
    assert params_only[0] / params_only[2] == pytest.approx(costs[0][0] / costs[2][0])


def steps_until_first_death(G, weights):
    for step in range(1, 10_000):
        proximal_step(G, lr=0.01, rho=1.0, weights=weights)
        dead = [int((~block.norm.alive).sum()) for block in G.blocks()]
        if any(dead):
            return step, dead
    raise AssertionError("nothing died")


def test_cost_weighted_penalty_prunes_the_expensive_layer_first():
    # a wide latent makes every block0 channel carry 500 x 49 weights: by far the most expensive channel here
    G = Generator(nz=500, channels=(8, 8, 8))
    with torch.no_grad():
        for gamma in gamma_parameters(G):
            gamma.fill_(1.0)
    weights = channel_costs(G, ChannelCost(params=1.0, macs=1.0))
    assert max(weights) == weights[0]
    _, dead = steps_until_first_death(G, weights)
    assert dead[0] == 8 and dead[1] == dead[2] == 0
    # the uniform penalty has no preference: all layers reach 0 at the same step
    H = Generator(nz=500, channels=(8, 8, 8))
    with torch.no_grad():
        for gamma in gamma_parameters(H):
            gamma.fill_(1.0)
    _, dead = steps_until_first_death(H, None)
    assert dead == [8, 8, 8]


# ---------------------------------------------------------------- files a run writes

def test_write_runtime_files_writes_artifact_and_runner(tmp_path):
    model = compact_model(4)
    report = runtime.write_runtime_files(model, str(tmp_path), runtime.VerifySettings(num_samples=64))
    assert sorted(os.listdir(tmp_path)) == [runtime.RUNTIME_NAME, runtime.RUNNER_NAME]
    assert report["runtime_bytes"] == os.path.getsize(tmp_path / runtime.RUNTIME_NAME)
    assert report["runtime_max_abs_diff"] <= runtime.TOLERANCE and report["runtime_exact"]
    assert report["runtime_reference_mismatches"] == 0
    assert report["runtime_float_layers"] == ["block0", "to_image"]
    assert report["runtime_integer_layers"] == ["block1", "block2"]
    assert report["runtime_block0_sums"] == "limbs" and report["runtime_block0_grid"] == 2.0 ** -16
    assert 0 < report["runtime_block0_grid_bound_steps"] < 0.01  # of an activation step


@pytest.mark.parametrize("diff,exact,message", [(1.0, True, "from the generator"),
                                                 (0.0, False, "from its integer reference")])
def test_write_runtime_files_refuses_a_mismatch_and_leaves_nothing(tmp_path, monkeypatch, diff, exact, message):
    verdict = runtime.judge(np.full(4, diff), runtime.VerifySettings())
    wrong = {**verdict, "exact": exact, "reference_mismatches": int(not exact), "num_samples": 1,
             "ok": verdict["ok"] and exact}
    monkeypatch.setattr(runtime, "verify_runtime", lambda *a, **k: wrong)
    with pytest.raises(RuntimeError, match=message):
        runtime.write_runtime_files(compact_model(8), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_write_runtime_files_says_why_16_bit_has_none(tmp_path):
    report = runtime.write_runtime_files(Generator(channels=(4, 4, 4), bits=16).eval(), str(tmp_path))
    assert report["runtime_artifact"] is None and "16-bit" in report["runtime_note"]
    assert os.listdir(tmp_path) == []


def test_runtime_forward_takes_and_returns_tensors(artifacts):
    model, path = artifacts[4]
    z, labels = model.sample_inputs(9, generator=torch.Generator().manual_seed(5))
    images = runtime.runtime_forward(path, threads=1)(z, labels)
    with torch.no_grad():
        assert isinstance(images, torch.Tensor) and (images - model(z, labels)).abs().max() <= runtime.TOLERANCE


def test_runtime_cost_row_of_a_model_without_a_file():
    teacher = Generator(channels=(8, 4, 4), bits=32).eval()
    row = runtime.runtime_cost_row(teacher, speed={"latency_repeats": 1, "throughput_repeats": 1,
                                                   "throughput_batch": 4}, threads=1)
    assert row["parameters"] == count_parameters(teacher) and row["macs"] == count_macs(teacher)
    assert abs(row["bytes"] - runtime.expected_bytes(teacher)) / row["bytes"] < 0.1 and row["images_per_s"] > 0


# ---------------------------------------------------------------- through the stage scripts

@pytest.fixture(scope="module")
def four_bit_compact_run(tiny_distill_run, tmp_path_factory):
    """A 4-bit, cost-weighted tiny student (stage 3) compressed by stage 4."""
    import compress_student
    import train_student
    from conftest import student_argv
    _, distill_dir = tiny_distill_run
    out = str(tmp_path_factory.mktemp("four-bit"))
    student = train_student.main(train_student.parse_args(
        student_argv(out, distill_dir, "--rho", "2.5", "--quant-bits", "4", "--penalty", "cost")))
    compact = compress_student.main(compress_student.parse_args(
        ["--out", out, "--student-dir", student, "--check-samples", "64", "--latency-repeats", "1",
         "--throughput-repeats", "1", "--throughput-batch", "4"]))
    return student, compact


def test_four_bit_end_to_end_through_the_stages(four_bit_compact_run, tmp_path):
    from utils.run.checkpoint import build_generator, load_checkpoint
    student_dir, compact_dir = four_bit_compact_run
    assert load_checkpoint(student_dir, "student")["args"]["penalty"] == "cost" and student_dir.endswith("-cost")
    compact = build_generator(load_checkpoint(compact_dir, "compact")).eval()
    assert compact.bits == 4
    path = os.path.join(compact_dir, runtime.RUNTIME_NAME)
    types, _ = initializer_types(path)
    assert all(types[f"{layer}.weight_int"][0] == TensorProto.INT4
               for layer in ("block0", "block1", "block2", "to_image"))
    assert abs(os.path.getsize(path) - runtime.expected_bytes(compact)) < 9000  # tiny model: the graph is most
    z, labels = compact.sample_inputs(30, generator=torch.Generator().manual_seed(9))
    np.savez(tmp_path / "zy.npz", z=z.numpy(), labels=labels.numpy())
    runner = os.path.join(compact_dir, runtime.RUNNER_NAME)  # the copy that ships beside the artifact
    assert open(runner).read() == open(RUNNER).read()
    run_runtime_only([path, "--inputs", str(tmp_path / "zy.npz"), "--out", str(tmp_path / "x.npy")])
    with torch.no_grad():
        assert np.abs(np.load(tmp_path / "x.npy") - compact(z, labels).numpy()).max() <= runtime.TOLERANCE
