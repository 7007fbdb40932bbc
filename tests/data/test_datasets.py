"""Datasets from their real file formats (made small here) and the errors on bad data."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from fake_data import write_cifar, write_fashion_mnist, write_image_folder, write_malicious_cifar

from slimmable.data import TensorImageDataset, create_datasets, create_loader, load_fashion_mnist


@pytest.fixture
def fmnist(tmp_path: Path) -> Path:
    return write_fashion_mnist(tmp_path / "fm", n_train=40, n_test=20)


def test_fashion_mnist_from_gzip_folder(fmnist: Path, tmp_path: Path) -> None:
    images, labels, folder = load_fashion_mnist(fmnist, "train", cache_dir=tmp_path / "cache")
    assert images.shape == (40, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (40,) and labels.dtype == torch.int64 and int(labels.max()) <= 9
    assert folder == fmnist
    raw = gzip.decompress((fmnist / "train-images-idx3-ubyte.gz").read_bytes())
    assert torch.equal(images.flatten(), torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8))


def test_fashion_mnist_uncompressed(tmp_path: Path) -> None:
    folder = write_fashion_mnist(tmp_path / "raw", n_train=10, n_test=10, compress=False)
    images, _, _ = load_fashion_mnist(folder, "test", cache_dir=tmp_path / "cache")
    assert images.shape == (10, 1, 28, 28)


def test_fashion_mnist_found_in_system_folder(fmnist: Path, tmp_path: Path) -> None:
    images, _, folder = load_fashion_mnist(None, "test", cache_dir=tmp_path / "c", system_dir=fmnist, download=False)
    assert folder == fmnist and images.shape[0] == 20


def test_fashion_mnist_nowhere_lists_three_ways(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(None, "train", cache_dir=tmp_path / "c", system_dir=tmp_path / "none", download=False)
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--set data.root=DIR" in msg and "train-images-idx3-ubyte.gz" in msg
    assert "data.download=true" in msg and str(tmp_path / "c") in msg


def test_fashion_mnist_given_root_missing_files(tmp_path: Path) -> None:
    folder = write_fashion_mnist(tmp_path / "fm", n_train=4, n_test=4)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"fm \(data.root\) lacks t10k-labels-idx1-ubyte"):
        load_fashion_mnist(folder, "train", cache_dir=tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_fashion_mnist(tmp_path / "missing", "train", cache_dir=tmp_path / "c")


def test_fashion_mnist_label_out_of_range(tmp_path: Path) -> None:
    folder = write_fashion_mnist(tmp_path / "fm", n_train=8, n_test=4, bad_label=True)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: label 12 is out of range 0..9"):
        load_fashion_mnist(folder, "train", cache_dir=tmp_path / "c")


def test_fashion_mnist_corrupt_file(tmp_path: Path) -> None:
    folder = write_fashion_mnist(tmp_path / "fm", n_train=8, n_test=4)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is not a readable gzip file"):
        load_fashion_mnist(folder, "train", cache_dir=tmp_path / "c")


def test_held_out_split_is_fixed_disjoint_and_unaugmented(fmnist: Path, tmp_path: Path) -> None:
    kw = dict(download=False, cache_dir=tmp_path / "c", val_size=10, split_seed=7)
    a = create_datasets("fashion_mnist", fmnist, **kw)
    b = create_datasets("fashion_mnist", fmnist, **kw)
    assert len(a.train) == 30 and len(a.val) == 10 and len(a.test) == 20
    assert torch.equal(a.val.indices, b.val.indices)  # same seed, same split
    assert not set(a.val.indices.tolist()) & set(a.train.indices.tolist())
    assert a.train.augment == "crop_flip" and a.val.augment == "none" and a.test.augment == "none"
    c = create_datasets("fashion_mnist", fmnist, **{**kw, "split_seed": 8})
    assert not torch.equal(a.val.indices, c.val.indices)
    assert a.preprocess() == {
        "dataset": "fashion_mnist",
        "image_size": 28,
        "eval_resize": None,
        "in_chans": 1,
        "mean": [0.286],
        "std": [0.353],
        "num_classes": 10,
    }
    with pytest.raises(ValueError, match="val_size 40 leaves no training images"):
        create_datasets("fashion_mnist", fmnist, **{**kw, "val_size": 40})


def test_tensor_dataset_batches_are_normalised(fmnist: Path, tmp_path: Path) -> None:
    splits = create_datasets("fashion_mnist", fmnist, download=False, cache_dir=tmp_path / "c", image_size=16)
    x, y = splits.test.__getitems__([0, 1, 2])
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32 and y.tolist() == splits.test.labels[:3].tolist()
    x0, y0 = splits.test[0]
    assert torch.equal(x0, x[0]) and y0 == int(y[0])
    raw = splits.test.images[:3].float() / 255
    native = create_datasets("fashion_mnist", fmnist, download=False, cache_dir=tmp_path / "c").test
    torch.testing.assert_close(native.__getitems__([0, 1, 2])[0], (raw - 0.286) / 0.353)


def test_cifar10_and_cifar100(tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "c10", 10, per_batch=6, n_test=8)
    s = create_datasets("cifar10", root, val_size=5)
    assert (len(s.train), len(s.val), len(s.test)) == (25, 5, 8)
    x, _ = s.train.__getitems__([0, 1])
    assert x.shape == (2, 3, 32, 32) and s.num_classes == 10 and s.in_chans == 3
    # the root may also be the pickle folder itself
    assert len(create_datasets("cifar10", root / "cifar-10-batches-py").test) == 8
    s100 = create_datasets("cifar100", write_cifar(tmp_path / "c100", 100, per_batch=12, n_test=4))
    assert s100.num_classes == 100 and len(s100.train) == 12 and int(s100.train.labels.max()) < 100


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py does not exist"):
        create_datasets("cifar10", tmp_path)
    root = write_cifar(tmp_path / "c", 10, per_batch=2, n_test=2)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        create_datasets("cifar10", root)
    bad = write_cifar(tmp_path / "bad", 10, per_batch=3, n_test=2, bad_label=True)
    with pytest.raises(ValueError, match="label 15 is out of range 0..9"):
        create_datasets("cifar10", bad)
    (bad / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable batch file"):
        create_datasets("cifar10", bad)
    with pytest.raises(ValueError, match="needs data.root"):
        create_datasets("cifar10", None)


def test_image_folder_train_val(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "img", n_train=4, n_val=2, size=40)
    s = create_datasets("image_folder", root, image_size=32, augment="mobile", val_size=3)
    assert s.num_classes == 3 and len(s.train) == 9 and len(s.val) == 3 and len(s.test) == 6
    x, y = s.train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 3
    assert s.test[0][0].shape == (3, 32, 32) and s.eval_resize == 37
    loader = create_loader(s.test, 4, train=False)
    assert sum(int(b[1].numel()) for b in loader) == 6


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"img/val does not exist"):
        create_datasets("image_folder", tmp_path / "img")
    root = write_image_folder(tmp_path / "a", n_train=2, n_val=1)
    (root / "train" / "dog").mkdir()
    with pytest.raises(FileNotFoundError, match=r"a/train.*dog"):
        create_datasets("image_folder", root)
    (root / "train" / "dog").rmdir()
    (root / "val" / "bee").rename(root / "val" / "bat")
    with pytest.raises(ValueError, match="train/ and val/ have different classes"):
        create_datasets("image_folder", root)
    empty = tmp_path / "empty"
    (empty / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty/val"):
        create_datasets("image_folder", empty, load_train=False)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "img", n_train=2, n_val=2)
    broken = root / "val" / "bee" / "1.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    s = create_datasets("image_folder", root, image_size=16, load_train=False)
    with pytest.raises(ValueError, match=rf"cannot read image {broken}"):
        for _ in create_loader(s.test, 2, train=False):
            pass


def test_tensor_dataset_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"images must be \(N, C, H, W\) uint8"):
        TensorImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="3 images but labels of shape"):
        TensorImageDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.zeros(2), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="augment 'mobile' is not available"):
        TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2), (0.5,), (0.5,), augment="mobile")


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="dataset 'mnist' is not one of fashion_mnist, cifar10"):
        create_datasets("mnist")


def test_cifar_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "pwned"
    root = write_malicious_cifar(tmp_path / "evil", marker)
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:  # the payload works with plain pickle
        pickle.load(f)
    assert marker.is_dir()
    marker.rmdir()
    for split_args in ({}, {"load_train": False}):
        with pytest.raises(ValueError, match=r"refers to posix\.mkdir.*could run code.*not loaded"):
            create_datasets("cifar10", root, **split_args)
    assert not marker.exists()


def test_unreadable_image_in_a_worker_is_one_line(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "img", n_train=2, n_val=2)
    broken = root / "val" / "ant" / "0.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    s = create_datasets("image_folder", root, image_size=16, load_train=False)
    with pytest.raises(ValueError, match=rf"cannot read image {broken}") as info:
        for _ in create_loader(s.test, 2, train=False, num_workers=1):
            pass
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
