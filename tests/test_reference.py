"""The eager integer reference of generator.onnx (utils/compression/reference.py): the artifact equals it bit for bit
at 8 and 4 bits, a one-step change of any requantisation shift or zero point breaks that, and the artifact check
refuses an artifact that differs from it however little."""
import copy

import numpy as np
import onnx
import pytest
import torch

from conftest import handmade_student
from utils.compression import runtime
from utils.compression.compress import compress
from utils.compression.ort_runner import generate, load_session
from utils.compression.reference import IMAGE_TOLERANCE, _layer_verdict, layer_check, limb_sums, reference_images, \
    tanh

SAMPLES = 96  # fixed inputs: every class, enough activations that a one-step change shows


def compact_model(bits, image_size=28, image_channels=1):
    channels = (12, 8, 6) if image_size == 28 else (12, 8, 6, 5)
    dead = ([0, 3], [1], [2, 4]) if image_size == 28 else ([0, 3], [1], [2], [0])
    return compress(handmade_student(channels=channels, bits=bits, dead=dead, image_size=image_size,
                                     image_channels=image_channels))


@pytest.fixture(scope="module", params=[8, 4])
def shipped(request, tmp_path_factory):
    """(program, runtime images, fixed inputs) of a compact model's generator.onnx."""
    model = compact_model(request.param)
    path = str(tmp_path_factory.mktemp("reference") / "g.onnx")
    runtime.save_runtime_artifact(model, path)
    z, labels = model.sample_inputs(SAMPLES, generator=torch.Generator().manual_seed(11))
    images = generate(load_session(path), z.numpy(), labels.numpy())
    return runtime.lower(model), images, (z, labels), model


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_reference_matches_the_artifact_bit_for_bit(shipped):
    program, images, inputs, model = shipped
    assert same_bits(reference_images(program, *inputs).numpy(), images)
    with torch.no_grad():  # and both compute the compact model, up to rare rounding flips
        assert np.abs(images - model(*inputs).numpy()).mean() <= runtime.MEAN_TOLERANCE


@pytest.mark.parametrize("bits", [8, 4])
def test_reference_matches_a_32_pixel_rgb_artifact(tmp_path, bits):
    model = compact_model(bits, image_size=32, image_channels=3)
    path = str(tmp_path / "g.onnx")
    runtime.save_runtime_artifact(model, path)
    z, labels = model.sample_inputs(32, generator=torch.Generator().manual_seed(3))
    images = generate(load_session(path), z.numpy(), labels.numpy())
    assert images.shape == (32, 3, 32, 32)
    assert same_bits(reference_images(runtime.lower(model), z, labels).numpy(), images)


def one_step_changes(program: runtime.IntegerProgram) -> dict:
    """{what: change(program)}: every requantisation shift (its multiplier doubled or halved), every shift of
    block0's limbs one bit up or down, and every zero point moved by one step. (One unit of an int32 bias is below
    the grid at 4 bits, by design: see `runtime.weight_multipliers`; the artifact check's test below moves one at
    8 bits.)"""
    def setter(layer, field, value):
        def change(p):
            setattr(layer(p), field, value(getattr(layer(p), field)))
        return change
    changes = {"block0 shift up": setter(lambda p: p.latent, "quant_scale", lambda v: v * 2),
               "block0 shift down": setter(lambda p: p.latent, "quant_scale", lambda v: v / 2),
               "block0 zero point": setter(lambda p: p.latent, "zero", lambda v: v + 1),
               "block0 limb zero point up": setter(lambda p: p.latent, "limb_zero", lambda v: v + 1),
               "block0 limb zero point down": setter(lambda p: p.latent, "limb_zero", lambda v: v - 1)}
    for k, shift in enumerate(program.latent.limb_shifts):
        for step in (1, -1) if shift else (1,):
            def moved(shifts, k=k, step=step):
                return tuple(s + step * (i == k) for i, s in enumerate(shifts))
            changes[f"block0 limb {k} shift {step:+d}"] = setter(lambda p: p.latent, "limb_shifts", moved)
    for name in program.blocks:
        def layer(p, name=name):
            return p.blocks[name]
        changes.update({f"{name} shift up": setter(layer, "scale", lambda v: v * np.float32(2)),
                        f"{name} shift down": setter(layer, "scale", lambda v: v / np.float32(2)),
                        f"{name} input zero point": setter(layer, "input_zero", lambda v: v + 1),
                        f"{name} weight zero point up": setter(layer, "weight_zero", lambda v: v + 1),
                        f"{name} weight zero point down": setter(layer, "weight_zero", lambda v: v - 1),
                        f"{name} output zero point": setter(layer, "output_zero", lambda v: v + 1)})
    changes.update({"to_image input zero point": setter(lambda p: p.image, "input_zero", lambda v: v + 1),
                    "to_image weight zero point up": setter(lambda p: p.image, "weight_zero", lambda v: v + 1),
                    "to_image weight zero point down": setter(lambda p: p.image, "weight_zero", lambda v: v - 1)})
    return changes


def test_a_one_step_change_of_any_shift_or_zero_point_breaks_the_match(shipped):
    program, images, inputs, _ = shipped
    changes = one_step_changes(program)
    assert program.latent.sums == "limbs" and len(changes) == 5 + 5 + 6 * len(program.blocks) + 3
    still_equal = []
    for what, change in changes.items():
        changed = copy.deepcopy(program)
        change(changed)
        if same_bits(reference_images(changed, *inputs).numpy(), images):
            still_equal.append(what)
    assert still_equal == []


def test_verify_refuses_a_one_step_change_that_the_mean_lets_pass(tmp_path):
    """An artifact whose graph has one int32 bias one unit off: a handful of activations one step away, far inside
    the image tolerances against the compact model, but not its integer reference: refused. Checked against the
    changed program itself (graph and reference agree bit for bit), the layer check refuses it: one unit moves the
    layer's pre-activations by twice the half unit its bias rounding may."""
    model = compact_model(8)
    program = runtime.lower(model)
    program.blocks["block2"].bias = program.blocks["block2"].bias + 1
    path = str(tmp_path / "g.onnx")
    runtime.save_runtime_artifact(model, path, program)
    settings = runtime.VerifySettings(num_samples=256)
    verdict = runtime.verify_runtime(model, path, settings)
    assert verdict["mean_abs_diff"] <= settings.mean_tolerance  # the second guard alone would pass it
    assert verdict["pixels_over_tolerance"] <= settings.pixel_share * verdict["num_pixels"]
    assert verdict["exact"] is False and verdict["reference_mismatches"] > 0 and not verdict["ok"]
    own = runtime.verify_runtime(model, path, settings, program)
    assert own["exact"] and not own["ok"]
    assert {name for name, v in own["layer_check"]["layers"].items() if v["violations"]} == {"block2"}


def test_layer_check_passes_the_shipped_program(shipped):
    program, _, inputs, model = shipped
    verdict = layer_check(program, model, *inputs)
    assert verdict["ok"] and verdict["image_max_abs_diff"] <= IMAGE_TOLERANCE
    assert set(verdict["layers"]) == {"block0", *program.blocks}
    assert all(v["violations"] == 0 and v["max_distance"] <= v["max_bound"] for v in verdict["layers"].values())


def test_layer_check_refuses_every_one_step_change(shipped):
    """What the exact comparison catches between graph and reference, the layer check catches in the program
    itself (where graph and reference would share the change)."""
    program, _, inputs, model = shipped
    passed = []
    for what, change in one_step_changes(program).items():
        changed = copy.deepcopy(program)
        change(changed)
        if layer_check(changed, model, *inputs)["ok"]:
            passed.append(what)
    assert passed == []


def test_layer_verdict_allows_a_flip_only_at_a_rounding_boundary():
    """An activation may be the rounded pre-activation's neighbour only where the pre-activation lies within the
    layer's bound of a half step; anywhere else one step off is a violation, and so is two steps anywhere."""
    bound = torch.full((1, 2, 1, 1), 0.01)
    pre = torch.tensor([[[[2.495, 7.2]], [[0.3, 14.6]]]])  # (1, 2, 1, 2) in steps
    rounded = torch.tensor([[[[2.0, 7.0]], [[0.0, 15.0]]]])
    assert _layer_verdict(rounded, pre, bound, top=15) == {
        "violations": 0, "flips": 0, "activations": 4, "max_distance": pytest.approx(0.495),
        "max_bound": pytest.approx(0.51)}
    flipped = rounded.clone()
    flipped[0, 0, 0, 0] = 3.0  # 2.495 is 0.005 from the half step: a rounding-boundary flip
    verdict = _layer_verdict(flipped, pre, bound, top=15)
    assert verdict["violations"] == 0 and verdict["flips"] == 1
    far = rounded.clone()
    far[0, 0, 0, 1] = 8.0  # 7.2 is 0.3 from the half step
    assert _layer_verdict(far, pre, bound, top=15)["violations"] == 1
    assert _layer_verdict(rounded, pre + 0.02, bound, top=15)["violations"] == 1  # 2.515 rounds to 3, not 2
    clipped = torch.tensor([[[[2.0, 7.0]], [[0.0, 15.0]]]])
    assert _layer_verdict(clipped, torch.tensor([[[[2.4, 7.0]], [[-3.0, 40.0]]]]), bound, 15)["violations"] == 0


def test_the_rational_tanh_is_tanh_to_float32_precision():
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float32)
    assert (tanh(x).double() - torch.tanh(x.double())).abs().max() < 5e-7
    assert tanh(torch.tensor([0.0, 20.0, -20.0])).tolist() == [0.0, 1.0, -1.0]


# ---------------------------------------------------------------- block0's limbs (runtime.BLOCK0_SUMS)

def grid_edge_inputs(model):
    """Latents at the grid's edges: ties between two grid points (round half to even), the clip's bounds and
    beyond, huge, tiny and negative zero, beside ordinary draws."""
    z, labels = model.sample_inputs(SAMPLES, generator=torch.Generator().manual_seed(5))
    unit = 2.0 ** -runtime.FRACTION_BITS
    edges = [0.5 * unit, 1.5 * unit, -2.5 * unit, 7 + 0.5 * unit, runtime.LIMIT * unit, -runtime.LIMIT * unit,
             (runtime.LIMIT + 0.5) * unit, 16.0, -20.0, 1e30, -1e30, 1e-30, -0.0]
    z[:4, :len(edges)] = torch.tensor(edges)
    z[4:6], z[6:8] = runtime.LIMIT * unit, -runtime.LIMIT * unit  # whole rows at the bounds: the largest sums
    return z, labels


@pytest.mark.parametrize("bits", [8, 4])
def test_limb_sums_are_the_exact_integer_sums_and_the_artifact_equals_them_at_the_grids_edges(tmp_path, bits):
    model = compact_model(bits)
    program = runtime.lower(model)
    p = program.latent
    z, labels = grid_edge_inputs(model)
    x = torch.cat([z, torch.from_numpy(p.embed)[labels]], dim=1)
    grid = np.clip(np.rint(x.double().numpy() * 2.0 ** p.fraction_bits), -p.limit, p.limit).astype(np.int64)
    assert np.array_equal(limb_sums(p, x).numpy(), (grid @ p.ints.astype(np.int64)).astype(np.float64))
    path = str(tmp_path / "g.onnx")
    runtime.save_runtime_artifact(model, path, program)
    assert same_bits(reference_images(program, z, labels).numpy(),
                     generate(load_session(path), z.numpy(), labels.numpy()))


@pytest.mark.parametrize("bits", [8, 4])
def test_the_grid_moves_block0_by_less_than_its_bound_and_far_less_than_one_step(bits):
    model = compact_model(bits)
    limbs, floats = runtime.lower(model, "limbs").latent, runtime.lower(model, "float64").latent
    z, labels = model.sample_inputs(SAMPLES, generator=torch.Generator().manual_seed(7))
    x = torch.cat([z, torch.from_numpy(limbs.embed)[labels]], dim=1)
    moved = (limb_sums(limbs, x) * 2.0 ** -limbs.fraction_bits - x.double() @ torch.from_numpy(limbs.ints).double())
    per_step = moved.view(len(z), len(limbs.scale), -1).abs() * torch.from_numpy(limbs.scale).view(1, -1, 1)
    bound = runtime.grid_bound(limbs)
    assert 0 < per_step.max() <= bound < 0.01 and runtime.grid_bound(floats) == 0


@pytest.mark.parametrize("bits", [8, 4])
def test_the_float64_path_stays_exact_and_takes_an_embedding_outside_the_grid(tmp_path, bits):
    model = compact_model(bits)
    with torch.no_grad():
        model.embed.weight[1, 0] = 20.0  # beyond the grid's +-15.87: the limbs would clip it
    program = runtime.lower(model)
    assert program.latent.sums == "float64"
    path = str(tmp_path / "g.onnx")
    runtime.save_runtime_artifact(model, path, program)
    z, labels = model.sample_inputs(32, generator=torch.Generator().manual_seed(2))
    assert same_bits(reference_images(program, z, labels).numpy(),
                     generate(load_session(path), z.numpy(), labels.numpy()))
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert "MatMul" in ops and "MatMulInteger" not in ops
