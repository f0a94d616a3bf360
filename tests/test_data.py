import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_PUBLIC, TINY_TEST, TINY_TRAIN, write_tiny_dataset
from utils.data import datasets as data
from utils.data.datasets import EpochBatches, index_fingerprint, load_split, read_idx, seeded_subset, subset_ids
from utils.run.cli import UserError


def test_splits_are_disjoint_deterministic_and_cover(tiny_data_root):
    public = load_split("fashion-mnist", "public", tiny_data_root, TINY_PUBLIC)
    private = load_split("fashion-mnist", "private", tiny_data_root, TINY_PUBLIC)
    everything = load_split("fashion-mnist", "all", tiny_data_root, TINY_PUBLIC)
    assert len(public) == TINY_PUBLIC and len(private) == TINY_TRAIN - TINY_PUBLIC
    assert not set(public.indices.tolist()) & set(private.indices.tolist())
    assert sorted(public.indices.tolist() + private.indices.tolist()) == list(range(TINY_TRAIN))
    assert torch.equal(everything.images[private.indices], private.images)
    again = load_split("fashion-mnist", "private", tiny_data_root, TINY_PUBLIC)
    assert torch.equal(again.indices, private.indices) and again.fingerprint == private.fingerprint
    other_seed = load_split("fashion-mnist", "private", tiny_data_root, TINY_PUBLIC, partition_seed=1)
    assert other_seed.fingerprint != private.fingerprint
    assert public.partition == private.partition and public.partition["private_size"] == len(private)


def test_seeded_subset_is_deterministic_recorded_and_keeps_the_split_it_is_of(tiny_data_root):
    private = load_split("fashion-mnist", "private", tiny_data_root, TINY_PUBLIC)
    everything = load_split("fashion-mnist", "all", tiny_data_root, TINY_PUBLIC)
    subset, again, other = (seeded_subset(private, 50, seed) for seed in (3, 3, 4))
    assert len(subset) == 50 and torch.equal(subset.images, again.images) and subset.subset == again.subset
    assert not torch.equal(subset.images, other.images) and subset.subset["fingerprint"] != other.subset["fingerprint"]
    ids = subset_ids(private, subset.subset)  # rebuilt from the record alone
    assert len(set(ids.tolist()) & set(private.indices.tolist())) == 50
    assert torch.equal(everything.images[ids], subset.images) and torch.equal(everything.labels[ids], subset.labels)
    assert subset.subset == {"of": "private", "size": 50, "seed": 3, "fingerprint": index_fingerprint(ids)}
    assert subset.fingerprint == private.fingerprint and private.subset is None  # the ledger's split is unchanged
    with pytest.raises(UserError):
        subset_ids(private, {**subset.subset, "seed": 4, "fingerprint": subset.subset["fingerprint"]})
    with pytest.raises(UserError):
        seeded_subset(private, len(private) + 1, 0)


def test_test_split_and_batches_in_unit_range(tiny_data_root):
    test = load_split("fashion-mnist", "test", tiny_data_root, TINY_PUBLIC)
    assert len(test) == TINY_TEST and test.images.dtype == torch.uint8
    images, labels = next(iter(EpochBatches(test, 32, seed=0).epoch(0)))
    assert images.shape == (32, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    assert labels.dtype == torch.int64


def test_epoch_order_is_seeded_and_resumable(tiny_data_root):
    split = load_split("fashion-mnist", "public", tiny_data_root, TINY_PUBLIC)
    batches = EpochBatches(split, 16, seed=3)
    full = [labels for _, labels in batches.epoch(2)]
    resumed = [labels for _, labels in batches.epoch(2, start=4)]
    assert len(full) == len(batches) == 12 and len(resumed) == len(full) - 4  # never an empty, vacuous match
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a, b)
    assert not torch.equal(full[0], next(batches.epoch(1))[1])


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("compress", [True, False])
def test_reads_raw_idx_with_and_without_gz(tmp_path, layout, compress):
    root = tmp_path / "root"
    where = root if layout == "flat" else root / "FashionMNIST" / "raw"
    write_tiny_dataset(str(where), compress=compress)
    split = load_split("fashion-mnist", "all", str(root), TINY_PUBLIC)
    assert len(split) == TINY_TRAIN and split.source == str(where)


def test_truncated_idx_is_a_clear_error(tmp_path):
    write_tiny_dataset(str(tmp_path), compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated"):
        read_idx(str(path))


def test_missing_dataset_explains_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(data.DATASETS["fashion-mnist"], "debian", str(tmp_path / "nowhere"))
    monkeypatch.setattr(data, "_torchvision_download", lambda *args: None)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_split("fashion-mnist", "public", str(tmp_path))


def test_public_size_must_fit(tiny_data_root):
    with pytest.raises(UserError, match="public-size"):
        load_split("fashion-mnist", "public", tiny_data_root, TINY_TRAIN + 1)


def test_wrong_data_root_on_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "train_teacher.py", "--data-root", str(tmp_path / "missing"),
                             "--out", str(tmp_path / "out"), "--max-steps", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--data-root" in result.stderr and "apt-get install dataset-fashion-mnist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
