"""Datasets, transforms and the distributed samplers of the trainer.

Every dataset yields ``(image, label)`` with ``image`` a float32 tensor of shape ``(3, H, W)``
(normalised; grayscale sets are repeated to three channels) and ``label`` an ``int``.

Registry (:data:`DATASETS`):
  * ``digits``: scikit-learn's bundled handwritten digits (UCI optdigits test set, 1,797 8×8 images,
    10 classes), upscaled to 16×16 (``image_size`` changes it); a fixed 1,438 / 359 train/test split. Needs no download;
    without scikit-learn, ``<data_dir>/digits.npz`` (:func:`export_digits`) holds the same data.
  * ``cifar10``: CIFAR-10 from ``data_dir``, the first layout found of: the official python
    batches (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``; read with ``pickle``, so
    trusted files only), the official tarball ``cifar-10-python.tar.gz`` (extracted beside itself),
    JPEG files packed in ``cifar-10-jpeg-packed/{train,test}.npz`` (arrays ``jpeg``, ``offsets``,
    ``labels``; loaded without pickle), or JPEG files in ``cifar-10-jpeg/{train,test}/<class>/*.jpg``
    (class folders sorted = the official label ids). ``data_dir`` may name the layout's own
    directory or its parent. JPEG layouts are decoded once (``torchvision.io.decode_jpeg``, about
    4 s for 50,000 images) into a uint8 tensor held in memory; no decoding per epoch.
  * ``fashion_mnist``: torchvision's FashionMNIST reader over ``data_dir/FashionMNIST/raw``.
  * ``imagenet``: ``data_dir/train`` and ``data_dir/val`` as torchvision ImageFolders, with the
    standard RandomResizedCrop(224)+flip for training and resize 256 / center 224 for evaluation.
  * ``imagefolder``: any ``data_dir/train`` + ``data_dir/val`` ImageFolder tree, as ``imagenet``
    (its transforms; the classes are the folders; ``image_size`` default 224).
  * ``synthetic``: random images of any size, for throughput runs.

Determinism: training augmentations draw from a generator seeded by (seed, epoch, sample index)
(:class:`EpochSeeded`), so a sample's augmentation does not depend on the number of loader
workers, and a run resumed in the middle of an epoch sees exactly the batches an uninterrupted
run would (the sampler skips what was consumed: :class:`ResumableDistributedSampler`).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets as tv_datasets
from torchvision.datasets.utils import extract_archive
from torchvision.transforms import v2

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclasses.dataclass
class DataSplits:
    """Train and test datasets plus what the model needs to know about them."""

    train: Dataset
    test: Dataset
    num_classes: int
    image_size: int


class TensorImages(Dataset):
    """Images held in memory as a uint8 or float tensor ``(N, C, H, W)`` with int64 labels ``(N,)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


class EpochSeeded(Dataset):
    """Wraps a training dataset so that sample ``i`` of epoch ``e`` is transformed under the torch
    RNG seeded from ``(seed, e, i)``; the caller's RNG state is left untouched."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        gen = torch.default_generator  # CPU generator only: torch.manual_seed also seeds devices (~100x slower)
        saved = gen.get_state()
        gen.manual_seed(hash((self.seed, self.epoch, int(i))) & 0x7FFF_FFFF_FFFF_FFFF)  # int hashes are stable
        try:
            return self.dataset[i]
        finally:
            gen.set_state(saved)


def _normalize(mean, std) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def _load_digits(data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as ``(images (1797, 8, 8) float64 in [0, 16], labels (1797,) int64)``: from
    ``<data_dir>/digits.npz`` (arrays ``images``, ``target``: the same data, exported by
    :func:`export_digits` for a machine without scikit-learn) when it exists, else scikit-learn."""
    if data_dir and (Path(data_dir) / "digits.npz").is_file():
        with np.load(Path(data_dir) / "digits.npz", allow_pickle=False) as f:
            return torch.from_numpy(f["images"]), torch.from_numpy(f["target"])
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError("the digits dataset needs scikit-learn (pip install scikit-learn) or a digits.npz in "
                           "--data-dir (python -c 'from fastnet.data import export_digits; export_digits(DIR)' "
                           "where scikit-learn is installed)") from None
    bunch = load_digits()
    return torch.from_numpy(bunch.images), torch.from_numpy(bunch.target)


def export_digits(data_dir: str) -> Path:
    """Write scikit-learn's digits to ``<data_dir>/digits.npz`` (about 20 KB) for machines without
    scikit-learn (the GPU device image); returns the path."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    path = Path(data_dir) / "digits.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=bunch.images.astype(np.uint8), target=bunch.target.astype(np.int64))
    return path


def _digits(data_dir: str | None, image_size: int | None, samples: int, num_classes: int | None) -> DataSplits:
    size = image_size or 16
    raw_images, target = _load_digits(data_dir)
    images = raw_images.float().div_(16.0).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp_(0, 1).mul_(255).round_().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = target.long()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(20180730))  # fixed split
    n_test = len(labels) // 5
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    norm = _normalize((0.5,) * 3, (0.5,) * 3)
    train_tf = v2.Compose([v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)), *norm])
    return DataSplits(
        TensorImages(images[train_idx], labels[train_idx], train_tf),
        TensorImages(images[test_idx], labels[test_idx], v2.Compose(norm)),
        10, size,
    )


CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _cifar_batches_dir(data_dir: str | None) -> Path:
    expected = (
        "cifar-10-batches-py/{" + ",".join(CIFAR10_FILES) + "} (the official python batches), "
        "cifar-10-python.tar.gz (the official tarball), cifar-10-jpeg-packed/{train,test}.npz or "
        "cifar-10-jpeg/{train,test}/<class>/*.jpg (the JPEG layouts)"
    )
    if not data_dir:
        raise ValueError(f"dataset 'cifar10' needs --data-dir, a directory holding {expected}")
    root = Path(data_dir)
    for cand in (root / "cifar-10-batches-py", root):
        if all((cand / f).is_file() for f in CIFAR10_FILES):
            return cand
    tarball = root / "cifar-10-python.tar.gz"
    if tarball.is_file():
        extract_once(tarball, root / "cifar-10-batches-py")
        if all((root / "cifar-10-batches-py" / f).is_file() for f in CIFAR10_FILES):
            return root / "cifar-10-batches-py"
    raise ValueError(f"CIFAR-10 not found in data_dir {str(root)!r}: expected {expected}")


def extract_once(archive: Path, target: Path) -> None:
    """Extract ``archive`` so that it yields ``target`` (a directory the archive holds at its top),
    once however many processes ask at the same time: under an exclusive ``fcntl.flock`` on
    ``<target>.lock``, into a temporary directory beside ``target``, then renamed into place, so no
    process ever sees a half-written ``target``; a later call finds it ready and does nothing.

    Raises:
        ValueError: the archive does not hold ``target.name`` at its top.
    """
    import fcntl
    import shutil
    import tempfile

    if target.is_dir():
        return
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here until the first has renamed
        if target.is_dir():
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            extract_archive(str(archive), str(tmp))
            if not (tmp / target.name).is_dir():
                raise ValueError(f"{archive} does not hold {target.name}/ at its top")
            os.rename(tmp / target.name, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one official CIFAR python batch: a pickled dict with ``b"data"`` (uint8, N×3072, RGB
    planes of 32×32, row-major) and ``b"labels"``. Returns ``(N, 3, 32, 32)`` uint8 and ``(N,)`` int64.

    Trust: the file is unpickled (as torchvision does), which runs code a planted file carries; read
    only the official release from a directory only you can write. The JPEG layouts need no pickle."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = entry.get(b"labels", entry.get(b"fine_labels"))
    return torch.from_numpy(data.copy()), torch.as_tensor(labels, dtype=torch.long)


def decode_jpegs(blobs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Decode JPEG files (1-D uint8 tensors of their bytes) into one ``(N, 3, H, W)`` uint8 tensor
    (RGB; every image must have the same size). Raises ValueError for an undecodable file."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not blobs:
        return torch.empty(0, 3, 32, 32, dtype=torch.uint8)
    try:
        return torch.stack(decode_jpeg(list(blobs), mode=ImageReadMode.RGB))
    except RuntimeError as exc:
        raise ValueError(f"cannot decode the CIFAR-10 JPEG files: {exc}") from None


def read_packed_jpegs(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``.npz`` of the packed JPEG layout (``jpeg`` uint8 bytes of every file concatenated,
    ``offsets`` int64 (N+1,), ``labels`` int64 (N,); read with ``allow_pickle=False``). Returns
    ``(N, 3, 32, 32)`` uint8 and ``(N,)`` int64. Raises ValueError for a malformed file."""
    with np.load(path, allow_pickle=False) as d:
        try:
            jpeg, offsets, labels = d["jpeg"], d["offsets"], d["labels"]
        except KeyError as exc:
            raise ValueError(f"{path}: expected arrays jpeg, offsets, labels ({exc} missing)") from None
    if offsets.ndim != 1 or len(offsets) != len(labels) + 1 or offsets[-1] != len(jpeg):
        raise ValueError(f"{path}: offsets ({len(offsets)}) must be labels + 1 ({len(labels) + 1}) and end at "
                         f"the byte count {len(jpeg)}")
    data = torch.from_numpy(jpeg)
    images = decode_jpegs([data[offsets[i]:offsets[i + 1]] for i in range(len(labels))])
    return images, torch.from_numpy(labels.astype(np.int64))


def read_jpeg_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``root/<class>/*.jpg`` (class folders sorted: label ids; files sorted within a class) →
    ``(N, 3, 32, 32)`` uint8, ``(N,)`` int64. Raises ValueError when there are no class folders."""
    from torchvision.io import read_file

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class folders")
    blobs, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).glob("*.jpg")):
            blobs.append(read_file(str(f)))
            labels.append(label)
    return decode_jpegs(blobs), torch.tensor(labels, dtype=torch.long)


def _cifar_jpeg_layout(root: Path) -> tuple[str, Path] | None:
    """The JPEG layout under ``root`` (itself or its ``cifar-10-jpeg[-packed]`` child), or None."""
    for cand in (root / "cifar-10-jpeg-packed", root):
        if (cand / "train.npz").is_file() and (cand / "test.npz").is_file():
            return "packed", cand
    for cand in (root / "cifar-10-jpeg", root):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return "folders", cand
    return None


def cifar10_present(data_dir: str | os.PathLike) -> bool:
    """Whether ``data_dir`` holds CIFAR-10 in a layout ``cifar10`` reads (official batches or tarball,
    or a JPEG layout), without reading or extracting anything."""
    root = Path(data_dir)
    batches = any(all((c / f).is_file() for f in CIFAR10_FILES) for c in (root / "cifar-10-batches-py", root))
    return batches or (root / "cifar-10-python.tar.gz").is_file() or _cifar_jpeg_layout(root) is not None


def _cifar10(data_dir: str | None, image_size: int | None, samples: int, num_classes: int | None) -> DataSplits:
    jpeg = _cifar_jpeg_layout(Path(data_dir)) if data_dir else None
    has_batches = data_dir and any((c / "data_batch_1").is_file() or (c / "cifar-10-python.tar.gz").is_file()
                                   for c in (Path(data_dir) / "cifar-10-batches-py", Path(data_dir)))
    if jpeg is not None and not has_batches:  # the exact release wins when both are there
        kind, d = jpeg
        read = read_packed_jpegs if kind == "packed" else read_jpeg_folder
        (train_x, train_y), (test_x, test_y) = (read(d / ("train.npz" if kind == "packed" else "train")),
                                                read(d / ("test.npz" if kind == "packed" else "test")))
    else:
        d = _cifar_batches_dir(data_dir)
        parts = [read_cifar_batch(d / f) for f in CIFAR10_FILES[:-1]]
        train_x, train_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        test_x, test_y = read_cifar_batch(d / "test_batch")
    norm = _normalize(CIFAR_MEAN, CIFAR_STD)
    train_tf = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *norm])
    return DataSplits(TensorImages(train_x, train_y, train_tf), TensorImages(test_x, test_y, v2.Compose(norm)), 10, 32)


FASHION_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"]


def _fashion_mnist(data_dir: str | None, image_size: int | None, samples: int, num_classes: int | None) -> DataSplits:
    expected = "FashionMNIST/raw/{" + ",".join(FASHION_FILES) + "} (the official idx files, un-gzipped)"
    if not data_dir:
        raise ValueError(f"dataset 'fashion_mnist' needs --data-dir, a directory holding {expected}")
    to3 = [v2.ToImage(), v2.Grayscale(num_output_channels=3)]
    norm = _normalize((0.286,) * 3, (0.353,) * 3)
    try:
        train = tv_datasets.FashionMNIST(data_dir, train=True, download=False,
                                         transform=v2.Compose([*to3, v2.RandomCrop(28, padding=2), *norm]))
        test = tv_datasets.FashionMNIST(data_dir, train=False, download=False, transform=v2.Compose([*to3, *norm]))
    except RuntimeError:
        raise ValueError(f"Fashion-MNIST not found in data_dir {data_dir!r}: expected {expected}") from None
    return DataSplits(train, test, 10, 28)


def _image_folders(what: str, data_dir: str | None, image_size: int | None) -> DataSplits:
    """``data_dir/train`` and ``data_dir/val`` as torchvision ImageFolders with ImageNet's transforms
    (RandomResizedCrop + flip for training; resize to 256/224 of the size, center crop for evaluation).

    Raises:
        ValueError: a missing train/ or val/, a folder without images, or different class folders.
    """
    expected = "train/<class>/*.jpg and val/<class>/*.jpg (ImageFolder layout, one folder per class)"
    if not data_dir or not (Path(data_dir) / "train").is_dir() or not (Path(data_dir) / "val").is_dir():
        raise ValueError(f"{what} not found in data_dir {data_dir!r}: expected {expected}")
    size = image_size or 224
    norm = [v2.ToImage(), *_normalize(IMAGENET_MEAN, IMAGENET_STD)]
    tfs = {"train": v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), *norm]),
           "val": v2.Compose([v2.Resize(size * 256 // 224), v2.CenterCrop(size), *norm])}
    folders = {}
    for split, tf in tfs.items():
        try:
            folders[split] = tv_datasets.ImageFolder(str(Path(data_dir) / split), transform=tf)
        except FileNotFoundError as exc:  # no class folder, or no image file in them
            raise ValueError(f"{what}: {Path(data_dir) / split} holds no images ({' '.join(str(exc).split())[:200]}); "
                             f"expected {expected}") from None
    if folders["train"].classes != folders["val"].classes:
        raise ValueError(f"{what} train/ and val/ in {data_dir!r} have different class folders: "
                         f"{folders['train'].classes[:5]}... vs {folders['val'].classes[:5]}...")
    return DataSplits(folders["train"], folders["val"], len(folders["train"].classes), size)


def _imagenet(data_dir: str | None, image_size: int | None, samples: int, num_classes: int | None) -> DataSplits:
    return _image_folders("ImageNet", data_dir, image_size)


def _imagefolder(data_dir: str | None, image_size: int | None, samples: int, num_classes: int | None) -> DataSplits:
    return _image_folders("imagefolder", data_dir, image_size)


class SyntheticImages(Dataset):
    """``n`` random float32 images ``(3, size, size)`` from a pool of 64, labels ``i mod num_classes``.
    Costs nothing to load, so throughput runs measure the model and communication only."""

    def __init__(self, n: int, size: int, num_classes: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(64, 3, size, size, generator=g)
        self.n, self.num_classes = n, num_classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.pool[i % 64], i % self.num_classes


def _synthetic(data_dir: str | None, image_size: int | None, samples: int, num_classes: int | None) -> DataSplits:
    size, classes = image_size or 32, num_classes or 10
    return DataSplits(SyntheticImages(samples, size, classes, 1),
                      SyntheticImages(max(64, samples // 8), size, classes, 2), classes, size)


DATASETS: dict[str, Callable[[str | None, int | None, int, int | None], DataSplits]] = {
    "digits": _digits,
    "cifar10": _cifar10,
    "fashion_mnist": _fashion_mnist,
    "imagenet": _imagenet,
    "imagefolder": _imagefolder,
    "synthetic": _synthetic,
}


def hold_out(splits: DataSplits, n: int, seed: int = 20181130) -> tuple[Dataset, Dataset]:
    """Split ``n`` training images off as a validation set: a uniformly random subset drawn with
    its own generator (``seed``, the same for every run and every rank), so model choices can be
    made without the test set. The validation images get the test transform (no augmentation).
    Returns ``(train, validation)``.

    Raises:
        ValueError: ``n`` not in [1, len(train) − 1], or a dataset not held in memory as
            :class:`TensorImages` (digits and cifar10 are; ImageFolder and synthetic sets are not).
    """
    train, test = splits.train, splits.test
    if not isinstance(train, TensorImages):
        raise ValueError(f"val_samples needs a dataset held in memory (digits, cifar10); got {type(train).__name__}")
    if not 1 <= n < len(train):
        raise ValueError(f"Invalid val_samples: {n} (must be in [1, {len(train) - 1}] for {len(train)} training "
                         f"images)")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    keep, val = perm[n:].sort().values, perm[:n].sort().values
    test_tf = test.transform if isinstance(test, TensorImages) else None
    return (TensorImages(train.images[keep], train.labels[keep], train.transform),
            TensorImages(train.images[val], train.labels[val], test_tf))


def build_datasets(name: str, data_dir: str | None = None, image_size: int | None = None,
                   synthetic_samples: int = 4096, num_classes: int | None = None) -> DataSplits:
    """Build a registered dataset's splits.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), or a missing/incomplete
            ``data_dir`` (the message names the files expected there).
    """
    try:
        builder = DATASETS[name]
    except KeyError:
        raise ValueError(f"Unknown dataset {name!r}; valid datasets: {', '.join(sorted(DATASETS))}") from None
    return builder(data_dir, image_size, synthetic_samples, num_classes)


class ResumableDistributedSampler(Sampler[int]):
    """The training sampler: shuffled per epoch, sharded over ranks in blocks, resumable mid-epoch.

    Epoch ``e``'s permutation is ``torch.randperm(N)`` seeded with ``seed + e`` (as
    ``DistributedSampler``), the same on every rank and for every world size. It is cut into blocks
    of ``block_size`` indices (the trainer uses the micro-batch) and rank ``r`` of ``W`` takes
    blocks ``r, r + W, r + 2W, ...``; the tail that does not fill ``W`` blocks is dropped, so every
    rank has ``num_samples`` indices. Optimizer step ``k`` (``W × accumulation`` micro-batches)
    therefore consumes permutation positions ``[kB, (k+1)B)`` — the same images, in the same
    micro-batches, whatever the world size: a run resumed on another world size with the same
    global batch and micro-batch continues exactly where it stopped (:meth:`set_start_index`).
    With ``block_size=1`` the shards are ``DistributedSampler(drop_last=True)``'s.

    Raises:
        ValueError: ``rank`` not in ``[0, num_replicas)`` or ``block_size < 1``.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, block_size: int = 1) -> None:
        if not 0 <= rank < num_replicas or block_size < 1:
            raise ValueError(f"Invalid sampler shard: rank {rank} of {num_replicas}, block_size {block_size}")
        self.n = len(dataset)  # type: ignore[arg-type]
        self.num_replicas, self.rank, self.seed, self.block_size = num_replicas, rank, seed, block_size
        self.num_samples = self.n // (num_replicas * block_size) * block_size
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start_index(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's shard (those a resumed run consumed)."""
        self.start_index = start

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.num_samples * self.num_replicas]
        mine = perm.view(-1, self.block_size)[self.rank::self.num_replicas].reshape(-1)
        return iter(mine[self.start_index:].tolist())

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_index)


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank ``r`` of ``n`` gets indices ``r, r+n, r+2n, ...``; no padding and no
    duplicates, so per-rank counts all-reduced add up to exactly ``len(dataset)``."""

    def __init__(self, length: int, num_replicas: int, rank: int) -> None:
        self.indices: Sequence[int] = range(rank, length, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(dataset: Dataset, sampler: Sampler, micro_batch_size: int, workers: int, seed: int,
                 pin_memory: bool) -> DataLoader:
    """Loader of ``(micro_batch_size, 3, H, W)`` float32 batches. Its own generator keeps the global
    RNG untouched by iterator creation, which exact resume relies on."""
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=True, generator=torch.Generator().manual_seed(seed))


def eval_loader(dataset: Dataset, world_size: int, rank: int, batch_size: int, workers: int,
                pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), world_size, rank),  # type: ignore[arg-type]
                      num_workers=workers, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))
