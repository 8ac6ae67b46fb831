"""Datasets as uint8 tensors: CIFAR-10/100 from the official python-format
archives (download, md5 check, extraction, unpickling) and the embedded
"shapes10" set (synthetic.py).

The archive and every extracted file are checked against the md5 sums
torchvision lists for them; a mismatch stops with a message naming the file,
so a truncated download or a wrong file is never trained on. Tests point the
loader at fixture archives by passing their own `CifarSpec` (same layout,
their own md5 sums); the table below keeps the real ones.
"""
import dataclasses
import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import synthetic


class DataError(RuntimeError):
    """A dataset that is missing, corrupted or not what was asked for."""


@dataclasses.dataclass(frozen=True)
class CifarSpec:
    name: str
    url: str
    archive: str
    archive_md5: str
    folder: str  # what the archive extracts to
    train_files: tuple[tuple[str, str], ...]  # (file name, md5)
    test_files: tuple[tuple[str, str], ...]
    meta_file: tuple[str, str]
    label_key: str  # the labels inside each batch file
    names_key: str  # the class names inside the meta file
    num_classes: int

    def files(self) -> tuple[tuple[str, str], ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR = {
    "cifar10": CifarSpec(
        name="CIFAR-10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=(
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ),
        test_files=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
        meta_file=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        label_key="labels",
        names_key="label_names",
        num_classes=10,
    ),
    "cifar100": CifarSpec(
        name="CIFAR-100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive="cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
        test_files=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        meta_file=("meta", "7973b15100ade9c7d40fb424638fde48"),
        label_key="fine_labels",  # the paper's CIFAR-100 numbers are on the 100 fine classes
        names_key="fine_label_names",
        num_classes=100,
    ),
}
EMBEDDED = {"shapes10": len(synthetic.CLASSES)}
# The embedded set is generated at the size asked for, up to CIFAR's split
# sizes (50000 train images are 150 MB of uint8 and a few seconds to draw).
EMBEDDED_MAX_SIZES = {"train": 50_000, "test": 10_000}
DATASETS = (*CIFAR, *EMBEDDED)


@dataclasses.dataclass
class ImageData:
    train_images: torch.Tensor  # uint8 (N, 3, 32, 32)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def num_classes(dataset: str) -> int:
    """Known without loading anything, so the model is built (and its options
    checked) before a download starts."""
    if dataset in CIFAR:
        return CIFAR[dataset].num_classes
    if dataset in EMBEDDED:
        return EMBEDDED[dataset]
    raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _where_to_put(spec: CifarSpec, data_dir: Path) -> str:
    return (f"put {spec.archive} (md5 {spec.archive_md5}, from {spec.url}) into {data_dir}/, "
            f"or its extracted folder at {data_dir / spec.folder}/")


def _download(spec: CifarSpec, data_dir: Path) -> Path:
    target = data_dir / spec.archive
    partial = target.with_name(target.name + ".part")  # never leave a half file under the real name
    print(f"downloading {spec.url} -> {target}", flush=True)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(spec.url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as err:
        partial.unlink(missing_ok=True)
        raise DataError(f"could not download {spec.name} from {spec.url} ({err}); offline, "
                        f"{_where_to_put(spec, data_dir)}") from err
    os.replace(partial, target)
    return target


def _extract(archive: Path, spec: CifarSpec, data_dir: Path) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.split("/")[0] == spec.folder]
            for m in members:  # the archive is md5-checked, but never write outside data_dir anyway
                if not (m.isfile() or m.isdir()) or ".." in Path(m.name).parts or Path(m.name).is_absolute():
                    raise DataError(f"{archive}: unexpected member {m.name!r}; not the {spec.name} archive")
            tar.extractall(data_dir, members=members)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"{archive} could not be extracted ({err}); delete it and retry") from err


def _check_files(spec: CifarSpec, folder: Path) -> None:
    for name, expected in spec.files():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{spec.name}: {path} is missing; delete {folder} and rerun to extract the archive again")
        actual = md5sum(path)
        if actual != expected:
            raise DataError(f"{spec.name}: {path} is corrupted or not the {spec.name} file "
                            f"(md5 {actual}, expected {expected}); delete it and rerun")


def prepare_cifar(spec: CifarSpec, data_dir: Path, download: bool = True) -> Path:
    """The verified extracted folder: used if present, else extracted from the
    archive in data_dir, which is downloaded first if missing and `download`."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a directory")
    folder = data_dir / spec.folder
    if not folder.is_dir():
        archive = data_dir / spec.archive
        if not archive.is_file():
            if not download:
                raise DataError(f"{spec.name} not found in {data_dir}: {_where_to_put(spec, data_dir)} "
                                f"(or drop --no-download)")
            archive = _download(spec, data_dir)
        actual = md5sum(archive)
        if actual != spec.archive_md5:
            raise DataError(f"{archive} is corrupted or not the {spec.name} archive (md5 {actual}, expected "
                            f"{spec.archive_md5}); delete it and rerun")
        _extract(archive, spec, data_dir)
    _check_files(spec, folder)
    return folder


def _unpickle(path: Path) -> dict:
    # The official files are Python 2 pickles: latin1 maps their byte strings
    # (numpy's buffer included) one-to-one; keys may come back as bytes or str.
    with open(path, "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _load_batches(spec: CifarSpec, folder: Path, files) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name, _ in files:
        entry = _unpickle(folder / name)
        if "data" not in entry or spec.label_key not in entry:
            raise DataError(f"{spec.name}: {folder / name} has no 'data'/{spec.label_key!r} entries")
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(entry[spec.label_key]):
            raise DataError(f"{spec.name}: {folder / name} holds data of shape {data.shape}, "
                            f"expected (N, 3072) with one label per row")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.as_tensor(entry[spec.label_key], dtype=torch.int64))
    images, labels = torch.cat(images), torch.cat(labels)
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < spec.num_classes):
        raise DataError(f"{spec.name}: labels outside [0, {spec.num_classes}) in {folder}")
    return images, labels


def load_cifar(spec: CifarSpec, data_dir: Path, download: bool = True) -> ImageData:
    folder = prepare_cifar(spec, data_dir, download)
    train = _load_batches(spec, folder, spec.train_files)
    test = _load_batches(spec, folder, spec.test_files)
    meta = _unpickle(folder / spec.meta_file[0])
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec.names_key]]
    return ImageData(*train, *test, classes=names)


def prepare_dataset(name: str, data_dir: Path, download: bool = True, specs: Optional[dict] = None) -> None:
    """Download, extract and verify what `load_dataset` will read (CIFAR only)."""
    specs = CIFAR if specs is None else specs
    if name in specs:
        prepare_cifar(specs[name], Path(data_dir), download)


def load_dataset(name: str, data_dir: Path, download: bool = True, data_seed: int = 0,
                 train_size: Optional[int] = None, test_size: Optional[int] = None,
                 specs: Optional[dict] = None) -> ImageData:
    """Dataset `name` as uint8 tensors (CPU); train_size/test_size keep the first
    N images (the embedded set is generated at that size, default 5000/1000)."""
    specs = CIFAR if specs is None else specs
    if name in specs:
        data = load_cifar(specs[name], data_dir, download)
    elif name in EMBEDDED:
        for split, size in (("train", train_size), ("test", test_size)):
            if size is not None and size > EMBEDDED_MAX_SIZES[split]:
                raise DataError(f"--{split}-size {size} is larger than {name}'s {EMBEDDED_MAX_SIZES[split]} "
                                f"{split} images")
        train = synthetic.make_shapes(train_size or 5000, data_seed, "train")
        test = synthetic.make_shapes(test_size or 1000, data_seed, "test")
        return ImageData(*train, *test, classes=list(synthetic.CLASSES))
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    for split, size in (("train", train_size), ("test", test_size)):
        have = len(getattr(data, f"{split}_labels"))
        if size is not None and size > have:
            raise DataError(f"--{split}-size {size} is larger than {name}'s {have} {split} images")
        if size is not None:
            setattr(data, f"{split}_images", getattr(data, f"{split}_images")[:size])
            setattr(data, f"{split}_labels", getattr(data, f"{split}_labels")[:size])
    return data
