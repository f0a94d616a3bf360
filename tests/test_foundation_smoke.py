import os

from utils.checkpoint import build_generator, load_checkpoint


def test_tiny_teacher_fixture(tiny_teacher_run):
    out, run_dir = tiny_teacher_run
    checkpoint = load_checkpoint(os.path.join(out, "teacher", "latest"), "teacher")
    assert checkpoint["step"] == 3
    assert build_generator(checkpoint).channels == (16, 8, 4)
