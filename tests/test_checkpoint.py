import os
import pickle

import pytest
import torch

from models import Generator
from utils.run.checkpoint import (build_generator, load_checkpoint, mark_latest, new_run_dir, resolve_run_dir,
                                  save_checkpoint, unwrapped_state_dict)
from utils.run.cli import UserError


def generator_checkpoint(stage="teacher"):
    G = Generator(channels=(8, 4, 2), bits=8)
    return G, {"stage": stage, "model_args": {"generator": G.model_args()}, "generator": G.state_dict(),
               "step": 7, "privacy": {"mechanisms": [], "non_dp_reads": []}}


def test_round_trip_rebuilds_the_generator_without_flags(tmp_path):
    G, checkpoint = generator_checkpoint()
    run_dir = new_run_dir(str(tmp_path), "teacher", "x")
    save_checkpoint(run_dir, checkpoint)
    loaded = load_checkpoint(run_dir, "teacher")
    clone = build_generator(loaded)
    z, labels = G.sample_inputs(4)
    assert torch.equal(G.eval()(z, labels), clone.eval()(z, labels))
    assert loaded["step"] == 7 and loaded["run_dir"] == os.path.realpath(run_dir)


def test_run_dirs_are_numbered_and_latest_follows(tmp_path):
    first = new_run_dir(str(tmp_path), "teacher", "a")
    second = new_run_dir(str(tmp_path), "teacher", "b")
    assert os.path.basename(first) == "00000-a" and os.path.basename(second) == "00001-b"
    mark_latest(first)
    assert resolve_run_dir(str(tmp_path / "teacher")) == os.path.realpath(first)
    mark_latest(second)
    assert resolve_run_dir(str(tmp_path / "teacher" / "latest")) == os.path.realpath(second)


def test_wrong_stage_is_refused(tmp_path):
    _, checkpoint = generator_checkpoint("student")
    save_checkpoint(str(tmp_path), checkpoint)
    with pytest.raises(UserError, match="'student' checkpoint, expected teacher"):
        load_checkpoint(str(tmp_path), "teacher")


def test_corrupt_and_truncated_files_are_refused(tmp_path):
    _, checkpoint = generator_checkpoint()
    path = save_checkpoint(str(tmp_path), checkpoint)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(path)
    open(path, "wb").write(b"not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(path)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_arbitrary_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"stage": "teacher", "payload": Payload()}, str(path))
    with pytest.raises(UserError, match="never run code"):
        load_checkpoint(str(path))
    with open(tmp_path / "plain.pt", "wb") as handle:
        pickle.dump({"stage": "teacher", "payload": Payload()}, handle)
    with pytest.raises(UserError):
        load_checkpoint(str(tmp_path / "plain.pt"))
    assert not os.path.exists("pwned.txt")


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no checkpoint.pt"):
        load_checkpoint(str(tmp_path))


def test_unwrapped_state_dict_strips_wrapper_prefixes():
    wrapped = torch.nn.Module()
    wrapped._module = torch.nn.Linear(2, 2)
    assert set(unwrapped_state_dict(wrapped)) == {"weight", "bias"}
