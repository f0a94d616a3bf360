"""`--dataset folder` and `--dataset cifar10`: layouts, shapes, the decode cache and its invalidation, the partition
over the file list, and one clear line for every kind of bad folder."""
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import train_teacher
from conftest import ROOT
from image_folders import write_image_folder
from utils.data import folders as folder_data
from utils.data.datasets import index_fingerprint, load_split
from utils.data.folders import CACHE_PREFIX, CIFAR_DIR, ImageRequest, resize_and_crop
from utils.run.cli import UserError, run_script

PUBLIC = 30


@pytest.fixture
def rgb_folder(tmp_path):
    """3 classes x 40 RGB PNGs of 32x32."""
    return write_image_folder(str(tmp_path / "images"))


def cache_files(root):
    return sorted(name for name in os.listdir(root) if name.startswith(CACHE_PREFIX))


def count_decodes(monkeypatch) -> list:
    """Record every image file `folder_data` fully decodes."""
    decoded, original = [], folder_data.open_image
    monkeypatch.setattr(folder_data, "open_image", lambda path: decoded.append(path) or original(path))
    return decoded


def touch_later(path, seconds=10):
    info = os.stat(path)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + seconds * 10**9))


# ---------------------------------------------------------------- layouts and shapes

def test_folder_splits_shapes_and_pixels(rgb_folder):
    everything = load_split("folder", "all", rgb_folder, PUBLIC)
    test = load_split("folder", "test", rgb_folder, PUBLIC)
    public = load_split("folder", "public", rgb_folder, PUBLIC)
    private = load_split("folder", "private", rgb_folder, PUBLIC)
    assert len(everything) == 108 and len(test) == 12  # a tenth of each class (4 of 40) is held out
    assert test.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(public) == PUBLIC and len(private) == 108 - PUBLIC
    assert sorted(public.indices.tolist() + private.indices.tolist()) == list(range(108))
    assert everything.image_shape == (3, 32, 32) and everything.images.dtype == torch.uint8
    assert everything.num_classes == 3 and everything.classes == ("class_0", "class_1", "class_2")
    listing = folder_data.list_folder(rgb_folder)
    first_train = next(path for path, held_out in zip(listing.files, listing.is_test) if not held_out)
    pixels = np.asarray(Image.open(first_train)).transpose(2, 0, 1).copy()
    assert torch.equal(everything.images[0], torch.from_numpy(pixels))  # no resizing at the native size
    images, labels = everything.batch(torch.arange(8))
    assert images.shape == (8, 3, 32, 32) and images.min() >= -1 and images.max() <= 1


def test_sixty_four_pixel_folder_native_resized_and_grey(tmp_path):
    root = write_image_folder(str(tmp_path / "big"), num_classes=2, per_class=10, size=64)
    assert load_split("folder", "all", root, 5).image_shape == (3, 64, 64)
    small = load_split("folder", "all", root, 5, request=ImageRequest(32))
    grey = load_split("folder", "all", root, 5, request=ImageRequest(28, 1))
    assert small.image_shape == (3, 32, 32) and grey.image_shape == (1, 28, 28)
    path = os.path.join(root, "class_0", "img_000.png")
    with Image.open(path) as image:
        expected = np.asarray(T.CenterCrop(28)(T.Resize(28)(image.convert("L"))))
    all_grey = load_split("folder", "all", root, 5, request=ImageRequest(28, 1)).images
    assert any(torch.equal(image[0], torch.from_numpy(expected.copy())) for image in all_grey)
    assert len(cache_files(root)) == 3 * 4  # one cache per requested shape


@pytest.mark.parametrize("width,height", [(48, 40), (40, 48), (100, 37), (33, 33)])
def test_resize_and_crop_matches_torchvision(width, height):
    image = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    for size in (28, 32, 64):
        expected = T.CenterCrop(size)(T.Resize(size)(image))
        assert np.array_equal(np.asarray(resize_and_crop(image, size)), np.asarray(expected))


@pytest.mark.parametrize("extension", ["bmp", "jpg", "jpeg"])
def test_grey_files_give_one_channel_and_other_formats_read(tmp_path, extension):
    root = write_image_folder(str(tmp_path / "grey"), num_classes=2, per_class=5, extension=extension, grey=True)
    split = load_split("folder", "all", root, 3)
    assert split.image_shape == (1, 32, 32) and len(split) == 8
    assert load_split("folder", "all", root, 3, request=ImageRequest(channels=3)).image_shape == (3, 32, 32)


def test_train_and_test_subfolders_are_used_as_they_are(tmp_path):
    root = tmp_path / "split"
    write_image_folder(str(root / "train"), per_class=6)
    write_image_folder(str(root / "test"), per_class=2, seed=1)
    train, test = load_split("folder", "all", str(root), 5), load_split("folder", "test", str(root), 5)
    assert len(train) == 18 and len(test) == 6 and test.classes == train.classes


# ---------------------------------------------------------------- the cache

def test_cache_is_written_once_and_reused_without_decoding(rgb_folder, monkeypatch):
    decoded = count_decodes(monkeypatch)
    first = load_split("folder", "private", rgb_folder, PUBLIC)
    assert len(decoded) == 120 and len(cache_files(rgb_folder)) == 4
    again = load_split("folder", "private", rgb_folder, PUBLIC)
    assert len(decoded) == 120 and again.source.endswith("(cached)")  # nothing decoded the second time
    assert torch.equal(first.images, again.images) and first.fingerprint == again.fingerprint
    cached = np.load(os.path.join(rgb_folder, f"{CACHE_PREFIX}-native-auto.images.npy"), mmap_mode="r")
    assert isinstance(cached, np.memmap) and cached.dtype == np.uint8 and cached.shape == (120, 3, 32, 32)


def test_a_changed_file_is_noticed_and_decoded_again(rgb_folder, monkeypatch):
    before = load_split("folder", "all", rgb_folder, PUBLIC)
    before_test = load_split("folder", "test", rgb_folder, PUBLIC)
    decoded = count_decodes(monkeypatch)
    path = os.path.join(rgb_folder, "class_1", "img_007.png")
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(path)
    touch_later(path)  # a modification time that differs even on coarse-grained file systems
    after = load_split("folder", "all", rgb_folder, PUBLIC)
    after_test = load_split("folder", "test", rgb_folder, PUBLIC)
    assert len(decoded) == 120 and not after.source.endswith("(cached)")
    assert after.fingerprint != before.fingerprint and after.list_fingerprint != before.list_fingerprint
    white = [bool((image == 255).all()) for image in torch.cat([after.images, after_test.images])]
    assert sum(white) == 1 and not any(bool((image == 255).all()) for image in before.images)
    assert not any(bool((image == 255).all()) for image in before_test.images)
    touch_later(path)  # the same content with another time also counts as a change: the list is what is hashed
    load_split("folder", "all", rgb_folder, PUBLIC)
    assert len(decoded) == 240


def test_an_added_file_is_noticed(rgb_folder):
    before = load_split("folder", "all", rgb_folder, PUBLIC)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(os.path.join(rgb_folder, "class_2", "extra.png"))
    after = load_split("folder", "all", rgb_folder, PUBLIC)
    assert len(after) + len(load_split("folder", "test", rgb_folder, PUBLIC)) == 121
    assert after.partition["private_fingerprint"] != before.partition["private_fingerprint"]


# ---------------------------------------------------------------- privacy: partition and fingerprint

def test_partition_fingerprint_covers_the_file_list(tmp_path):
    a = write_image_folder(str(tmp_path / "a"))
    b = write_image_folder(str(tmp_path / "b"), seed=5)  # same names and counts, other pixels
    private_a, private_b = (load_split("folder", "private", root, PUBLIC) for root in (a, b))
    assert torch.equal(private_a.indices, private_b.indices)
    assert private_a.fingerprint != private_b.fingerprint
    assert private_a.fingerprint == index_fingerprint(private_a.indices, private_a.list_fingerprint)
    assert private_a.partition["private_fingerprint"] == private_a.fingerprint
    assert private_a.partition["private_size"] == len(private_a) == 108 - PUBLIC
    with pytest.raises(UserError, match="--public-size 108 must be between 1 and 107"):
        load_split("folder", "public", a, 108)


# ---------------------------------------------------------------- CIFAR-10 in torchvision's layout

def write_cifar(root, per_batch=6, extra=None):
    rng = np.random.default_rng(0)
    directory = os.path.join(root, CIFAR_DIR)
    os.makedirs(directory)
    for name in folder_data.CIFAR_TRAIN + (folder_data.CIFAR_TEST,):
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, per_batch)], "batch_label": name}
        with open(os.path.join(directory, name), "wb") as handle:
            pickle.dump({**batch, **(extra or {})}, handle, protocol=2)
    return directory


def test_cifar10_read_from_torchvisions_layout(tmp_path):
    directory = write_cifar(str(tmp_path))
    train = load_split("cifar10", "all", str(tmp_path), 10)
    test = load_split("cifar10", "test", str(tmp_path), 10)
    assert len(train) == 30 and len(test) == 6 and train.image_shape == (3, 32, 32) and train.num_classes == 10
    with open(os.path.join(directory, "data_batch_1"), "rb") as handle:
        first = pickle.load(handle)
    assert torch.equal(train.images[0], torch.from_numpy(first["data"][0].reshape(3, 32, 32)))
    assert train.labels[0] == first["labels"][0]
    assert load_split("cifar10", "all", str(tmp_path), 10, request=ImageRequest(28, 1)).image_shape == (1, 28, 28)


def test_cifar10_pickles_cannot_run_code(tmp_path):
    write_cifar(str(tmp_path), extra={"payload": os.getcwd})
    with pytest.raises(UserError, match="refused object"):
        load_split("cifar10", "all", str(tmp_path), 10)


def test_cifar10_missing_is_never_downloaded(tmp_path):
    with pytest.raises(UserError, match="nothing is downloaded"):
        load_split("cifar10", "all", str(tmp_path), 10)


# ---------------------------------------------------------------- bad folders: one line, exit 2, nothing written

def make_bad_folder(root, case):
    if case == "empty":
        os.makedirs(root)
    elif case == "no class folders":
        os.makedirs(root)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(os.path.join(root, "loose.png"))
    elif case == "one class":
        write_image_folder(root, num_classes=1, per_class=4)
    elif case == "class without images":
        write_image_folder(root, num_classes=2, per_class=4)
        os.makedirs(os.path.join(root, "class_9"))
        open(os.path.join(root, "class_9", "notes.txt"), "w").close()
    elif case == "unreadable image":
        write_image_folder(root, num_classes=2, per_class=4)
        with open(os.path.join(root, "class_1", "broken.png"), "wb") as handle:
            handle.write(b"this is not a PNG file")
    elif case == "truncated image":
        write_image_folder(root, num_classes=2, per_class=4)
        path = os.path.join(root, "class_0", "img_002.png")
        with open(path, "rb") as handle:
            data = handle.read()
        with open(path, "wb") as handle:
            handle.write(data[:len(data) // 2])
    elif case == "mixed sizes":
        write_image_folder(root, num_classes=2, per_class=4)
        write_image_folder(os.path.join(root, "class_1"), num_classes=1, per_class=1, size=64)
    return root


BAD_FOLDERS = {
    "empty": "is empty: expected one sub-folder of images per class",
    "no class folders": "has no class sub-folders",
    "one class": r"has only one class folder \('class_0'\): at least two are needed",
    "class without images": "class_9 has no images",
    "unreadable image": "broken.png",
    "truncated image": "img_002.png",
    "mixed sizes": "different sizes .* pass --image-size",
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folder_is_one_clear_error_and_nothing_is_written(tmp_path, case, capsys):
    root = make_bad_folder(str(tmp_path / "images"), case)
    with pytest.raises(UserError, match=BAD_FOLDERS[case]):
        load_split("folder", "all", root, 2)
    out = tmp_path / "out"
    argv = ["--dataset", "folder", "--data-root", root, "--public-size", "2", "--out", str(out),
            "--max-steps", "1", "--device", "cpu"]
    capsys.readouterr()
    assert run_script(train_teacher.main, train_teacher.parse_args, argv) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    if case in ("unreadable image", "truncated image"):
        assert os.path.join(root, "class_") in stderr  # the line names the file
    assert not out.exists()
    assert not any(name.startswith(CACHE_PREFIX) for _, _, names in os.walk(root) for name in names)


def test_mixed_sizes_are_fine_with_an_image_size(tmp_path):
    root = make_bad_folder(str(tmp_path / "images"), "mixed sizes")
    assert load_split("folder", "all", root, 2, request=ImageRequest(32)).image_shape == (3, 32, 32)


def test_a_size_that_no_model_has_asks_for_image_size(tmp_path):
    root = write_image_folder(str(tmp_path / "images"), num_classes=2, per_class=3, size=40)
    with pytest.raises(UserError, match="are 40x40: pass --image-size 28, 32 or 64"):
        load_split("folder", "all", root, 2)


def test_models_built_for_the_data_and_a_mismatch_is_refused(rgb_folder, tiny_data_root):
    from models import Discriminator, Generator
    from utils.data.datasets import check_data_fits, model_shape
    split = load_split("folder", "private", rgb_folder, PUBLIC)
    G = Generator(channels=(8, 6, 5, 4), **model_shape(split))
    D = Discriminator(channels=(4, 5, 6), **model_shape(split))
    images, labels = split.batch(torch.arange(6))
    assert G(*G.sample_inputs(6)).shape == images.shape and D(images, labels).shape == (6,)
    check_data_fits(split, G.model_args())
    fashion = load_split("fashion-mnist", "private", tiny_data_root, 200)
    check_data_fits(fashion, {"nz": 100, "num_classes": 10})  # model_args from before image sizes: 28x28 grey
    with pytest.raises(UserError, match="3x32x32 with 3 classes, but the model was built for 1x28x28 with 10"):
        check_data_fits(split, Generator().model_args())


def test_shapes_tool_writes_a_folder_the_loader_reads(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_shapes", os.path.join(ROOT, "tools", "make_shapes.py"))
    make_shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_shapes)
    make_shapes.main(make_shapes.parse_args(["--out", str(tmp_path / "shapes"), "--per-class", "4"]))
    split = load_split("folder", "all", str(tmp_path / "shapes"), 2)
    assert split.classes == tuple(sorted(make_shapes.SHAPES)) and split.image_shape == (3, 32, 32)
    assert len(split) == 12  # one of every four held out per class


def test_a_later_stage_asking_for_the_resolved_shape_reuses_the_first_cache(rgb_folder, monkeypatch):
    first = load_split("folder", "all", rgb_folder, PUBLIC)  # no shape given: the folder's own, 32x32 RGB
    decoded = count_decodes(monkeypatch)
    again = load_split("folder", "all", rgb_folder, PUBLIC, request=ImageRequest(32, 3))
    assert not decoded and torch.equal(first.images, again.images) and first.fingerprint == again.fingerprint
    grey = load_split("folder", "all", rgb_folder, PUBLIC, request=ImageRequest(32, 1))  # another shape: decoded
    assert len(decoded) == 120 and grey.image_shape == (1, 32, 32)
