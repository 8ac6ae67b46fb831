"""CIFAR loading from fixture archives written in the official python format
(generated here, never downloaded), md5 checks, and the embedded dataset."""
import dataclasses
import hashlib
import pickle
import tarfile

import numpy as np
import pytest
import torch

from fused_preact.train import data as data_mod
from fused_preact.train.data import CIFAR, DataError, load_dataset, prepare_cifar
from fused_preact.train.synthetic import CLASSES, make_shapes


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar_archive(directory, name: str, per_file: int = 20, seed: int = 0):
    """The official archive layout in miniature: Python-2-style protocol-2
    pickles with byte-string keys, uint8 (N, 3072) rows (R, G, B planes), label
    lists; tar.gz of the official folder. Returns (spec pointing at it, arrays)."""
    rng = np.random.default_rng(seed)
    real = CIFAR[name]
    classes = real.num_classes
    folder = directory / real.folder
    folder.mkdir(parents=True)
    arrays = {}
    for fname, _ in (*real.train_files, *real.test_files):
        images = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, size=per_file)]
        entry = {b"batch_label": f"batch {fname}".encode(), b"data": images,
                 b"filenames": [f"img{i}.png".encode() for i in range(per_file)]}
        if name == "cifar10":
            entry[b"labels"] = labels
        else:
            entry[b"fine_labels"] = labels
            entry[b"coarse_labels"] = [v // 5 for v in labels]
        (folder / fname).write_bytes(pickle.dumps(entry, protocol=2))
        arrays[fname] = (images, labels)
    meta_name = real.meta_file[0]
    if name == "cifar10":
        meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": per_file,
                b"num_vis": 3072}
    else:
        meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    (folder / meta_name).write_bytes(pickle.dumps(meta, protocol=2))
    archive = directory / real.archive
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=real.folder)
    spec = dataclasses.replace(
        real, url=archive.as_uri(), archive_md5=_md5(archive),
        train_files=tuple((f, _md5(folder / f)) for f, _ in real.train_files),
        test_files=tuple((f, _md5(folder / f)) for f, _ in real.test_files),
        meta_file=(meta_name, _md5(folder / meta_name)))
    # Leave only the archive, as a fresh download would.
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    return spec, arrays


def test_real_table_keeps_the_official_urls_and_md5s():
    c10, c100 = CIFAR["cifar10"], CIFAR["cifar100"]
    assert c10.url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert c10.archive_md5 == "c58f30108f718f92721af3b95e74349a"
    assert dict(c10.train_files)["data_batch_1"] == "c99cafc152244af753f735de768cd75f"
    assert dict(c10.test_files)["test_batch"] == "40351d587109b95175f43aff81a1287e"
    assert c100.url == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert c100.archive_md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert dict(c100.train_files)["train"] == "16019d7e3df5f24257cddd939b257f8d"
    assert c100.label_key == "fine_labels" and c100.num_classes == 100


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_loads_archive_in_the_official_format(tmp_path, name):
    spec, arrays = write_cifar_archive(tmp_path, name)
    data = load_dataset(name, tmp_path, download=False, specs={name: spec})
    n_train = 20 * len(spec.train_files)
    assert data.train_images.shape == (n_train, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (20, 3, 32, 32)
    assert data.num_classes == spec.num_classes
    first_train, labels = arrays[spec.train_files[0][0]]
    # Row layout: 1024 red, then green, then blue values, row-major.
    assert torch.equal(data.train_images[:20], torch.from_numpy(first_train).view(20, 3, 32, 32))
    assert data.train_labels[:20].tolist() == labels
    assert data.test_labels.tolist() == arrays[spec.test_files[0][0]][1]
    assert data.classes[1] == ("class1" if name == "cifar10" else "fine1")
    # The second call uses the verified extracted folder.
    (tmp_path / spec.archive).unlink()
    again = load_dataset(name, tmp_path, download=False, specs={name: spec}, train_size=7, test_size=5)
    assert torch.equal(again.train_images, data.train_images[:7]) and len(again.test_labels) == 5


def test_downloads_when_missing(tmp_path):
    source = tmp_path / "mirror"
    source.mkdir()
    spec, _ = write_cifar_archive(source, "cifar10", per_file=4)
    target = tmp_path / "data"
    folder = prepare_cifar(spec, target, download=True)  # from the file:// "mirror"
    assert folder == target / spec.folder and (target / spec.archive).is_file()
    assert not list(target.glob("*.part"))


def test_corrupted_archive_is_reported_not_used(tmp_path):
    spec, _ = write_cifar_archive(tmp_path, "cifar10", per_file=4)
    archive = tmp_path / spec.archive
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    archive.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"corrupted or not the CIFAR-10 archive \(md5 [0-9a-f]{32}, expected"):
        prepare_cifar(spec, tmp_path, download=False)
    assert not (tmp_path / spec.folder).exists()


def test_wrong_extracted_file_is_reported(tmp_path):
    spec, _ = write_cifar_archive(tmp_path, "cifar100", per_file=4)
    folder = prepare_cifar(spec, tmp_path, download=False)
    (folder / "test").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]}))
    with pytest.raises(DataError, match=r"cifar-100-python/test is corrupted or not the CIFAR-100 file"):
        load_dataset("cifar100", tmp_path, download=False, specs={"cifar100": spec})


def test_missing_extracted_file_is_reported(tmp_path):
    spec, _ = write_cifar_archive(tmp_path, "cifar10", per_file=4)
    folder = prepare_cifar(spec, tmp_path, download=False)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4 is missing"):
        prepare_cifar(spec, tmp_path, download=False)


def test_offline_without_files_says_where_to_put_them(tmp_path):
    with pytest.raises(DataError, match=r"put cifar-10-python.tar.gz \(md5 c58f30108f718f92721af3b95e74349a"):
        prepare_cifar(CIFAR["cifar10"], tmp_path / "empty", download=False)


def test_failed_download_says_where_to_put_the_files(tmp_path):
    spec = dataclasses.replace(CIFAR["cifar100"], url=(tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(DataError, match=r"could not download CIFAR-100 .* offline, put cifar-100-python.tar.gz"):
        prepare_cifar(spec, tmp_path / "data", download=True)
    assert not list((tmp_path / "data").glob("*"))


def test_subset_larger_than_the_set_is_an_error(tmp_path):
    spec, _ = write_cifar_archive(tmp_path, "cifar10", per_file=4)
    with pytest.raises(DataError, match="--train-size 100 is larger than cifar10's 20 train images"):
        load_dataset("cifar10", tmp_path, download=False, specs={"cifar10": spec}, train_size=100)


def test_embedded_set_is_deterministic_balanced_and_not_colour_coded():
    images, labels = make_shapes(600, seed=3)
    again, labels_again = make_shapes(600, seed=3)
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert images.shape == (600, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels, minlength=len(CLASSES)).tolist() == [60] * len(CLASSES)
    assert not torch.equal(make_shapes(600, seed=4)[0], images)
    assert not torch.equal(make_shapes(600, seed=3, split="test")[0], images)
    # Colour says nothing about the class: nearest class-mean colour is near chance.
    colour = images.float().mean(dim=(2, 3))
    means = torch.stack([colour[labels == k].mean(0) for k in range(len(CLASSES))])
    accuracy = ((colour[:, None] - means[None]).norm(dim=2).argmin(1) == labels).float().mean()
    assert accuracy < 0.25


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        data_mod.num_classes("mnist")
