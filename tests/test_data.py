import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from fastnet.data import (CIFAR10_FILES, EpochSeeded, ResumableDistributedSampler, ShardSampler, SyntheticImages,
                          build_datasets)


def write_cifar_batches(root, n_per_batch=4, seed=0):
    """Write CIFAR-10 in the official python-batch format (pickled dicts of bytes keys)."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    expected = {}
    for name in CIFAR10_FILES:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n_per_batch}, f)
        expected[name] = (data, labels)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}, f)
    return expected


def test_cifar10_python_batches(tmp_path):
    expected = write_cifar_batches(tmp_path)
    s = build_datasets("cifar10", str(tmp_path))
    assert len(s.train) == 20 and len(s.test) == 4 and s.num_classes == 10
    # pixel layout: the row holds the R plane, then G, then B, each 32x32 row-major
    data, labels = expected["test_batch"]
    assert torch.equal(s.test.images[1], torch.from_numpy(data[1].reshape(3, 32, 32)))
    assert s.test.labels.tolist() == labels
    x, y = s.train[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == expected["data_batch_1"][1][3]


def test_cifar10_official_tarball(tmp_path):
    src = tmp_path / "src"
    write_cifar_batches(src)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    s = build_datasets("cifar10", str(data_dir))
    assert len(s.train) == 20


CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar_jpegs(root, per_class=(2, 1), seed=0):
    """Both JPEG layouts of a tiny CIFAR-10: ``cifar-10-jpeg/{train,test}/<class>/NNNN.jpg`` and
    ``cifar-10-jpeg-packed/{train,test}.npz``, holding the same JPEG bytes. Returns the decoded
    reference images (PIL) and labels per split, in the folder layout's order."""
    import io

    rng = np.random.default_rng(seed)
    expected = {}
    (root / "cifar-10-jpeg-packed").mkdir(parents=True)
    for split, n in zip(("train", "test"), per_class):
        blobs, labels, images = [], [], []
        for label, cls in enumerate(CLASSES):
            (root / "cifar-10-jpeg" / split / cls).mkdir(parents=True)
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
                (root / "cifar-10-jpeg" / split / cls / f"{i:04d}.jpg").write_bytes(buf.getvalue())
                blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
                labels.append(label)
                images.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        np.savez(root / "cifar-10-jpeg-packed" / f"{split}.npz", jpeg=np.concatenate(blobs), offsets=offsets,
                 labels=np.array(labels, dtype=np.int64))
        expected[split] = (np.stack(images), labels)
    return expected


@pytest.mark.parametrize("layout", ["cifar-10-jpeg", "cifar-10-jpeg-packed", ""])
def test_cifar10_jpeg_layouts_decode_once_to_the_same_images(tmp_path, layout):
    expected = write_cifar_jpegs(tmp_path)
    s = build_datasets("cifar10", str(tmp_path / layout))
    assert len(s.train) == 20 and len(s.test) == 10 and s.num_classes == 10
    for split, ds in (("train", s.train), ("test", s.test)):
        images, labels = expected[split]
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(labels), 3, 32, 32)  # held in memory
        assert ds.labels.tolist() == labels
        diff = (ds.images.permute(0, 2, 3, 1).int() - torch.from_numpy(images).int()).abs()
        assert diff.float().mean() < 1.0  # torchvision's libjpeg vs PIL's: the same pixels up to rounding
    x, y = s.train[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == expected["train"][1][3]


def test_cifar10_official_batches_win_over_jpegs(tmp_path):
    write_cifar_jpegs(tmp_path)
    batches = write_cifar_batches(tmp_path)  # an exact release dropped in later is used with no change
    s = build_datasets("cifar10", str(tmp_path))
    assert len(s.train) == 20 and len(s.test) == 4
    assert torch.equal(s.test.images, torch.from_numpy(batches["test_batch"][0].reshape(-1, 3, 32, 32)))


def test_cifar10_malformed_packed_file(tmp_path):
    d = tmp_path / "cifar-10-jpeg-packed"
    d.mkdir()
    for split in ("train", "test"):
        np.savez(d / f"{split}.npz", jpeg=np.zeros(10, np.uint8), offsets=np.array([0, 4], np.int64),
                 labels=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="offsets .* must be labels \\+ 1 .* and end at the byte count 10"):
        build_datasets("cifar10", str(tmp_path))


REAL_PACKED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10-jpeg-packed"


@pytest.mark.skipif(not REAL_PACKED.is_dir(), reason="../shared/data/cifar-10-jpeg-packed absent")
def test_cifar10_real_packed_data():
    s = build_datasets("cifar10", str(REAL_PACKED))
    assert len(s.train) == 50000 and len(s.test) == 10000
    assert torch.bincount(s.train.labels).tolist() == [5000] * 10 and int(s.train.labels[0]) == 6  # frog


def test_cifar10_missing_files_named(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(ValueError, match="data_batch_1.*test_batch.*cifar-10-jpeg-packed"):
        build_datasets("cifar10", str(tmp_path))
    with pytest.raises(ValueError, match="needs --data-dir"):
        build_datasets("cifar10", None)


def _idx(path, magic_dims, shape, payload):
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, magic_dims) + struct.pack(">" + "I" * len(shape), *shape))
        f.write(payload.tobytes())


def test_fashion_mnist_idx_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", 3, (n, 28, 28), rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", 1, (n,), np.arange(n, dtype=np.uint8))
    s = build_datasets("fashion_mnist", str(tmp_path))
    assert len(s.train) == 6 and len(s.test) == 3
    x, y = s.test[2]
    assert x.shape == (3, 28, 28) and y == 2


def test_fashion_mnist_missing(tmp_path):
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        build_datasets("fashion_mnist", str(tmp_path))


def test_imagenet_folder(tmp_path):
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((40, 50, 3), 60 * i, dtype=np.uint8)).save(d / f"{i}.png")
    s = build_datasets("imagenet", str(tmp_path), image_size=32)
    assert s.num_classes == 2 and len(s.train) == 4
    assert s.train[0][0].shape == (3, 32, 32) and s.test[3] [0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="train/<class>"):
        build_datasets("imagenet", str(tmp_path / "nothing"))


def test_digits_is_real_and_split_fixed():
    s = build_datasets("digits")
    assert (len(s.train), len(s.test), s.num_classes, s.image_size) == (1438, 359, 10, 16)
    again = build_datasets("digits")
    assert torch.equal(s.test.images, again.test.images)
    assert sorted(set(s.test.labels.tolist())) == list(range(10))


def test_unknown_dataset_lists_valid():
    with pytest.raises(ValueError, match="valid datasets: cifar10, digits, fashion_mnist, imagefolder, imagenet, synthetic"):
        build_datasets("mnist")


def test_synthetic_any_shape():
    s = build_datasets("synthetic", image_size=24, synthetic_samples=100, num_classes=7)
    assert len(s.train) == 100 and s.num_classes == 7 and s.train[5][0].shape == (3, 24, 24)
    assert isinstance(s.train, SyntheticImages) and s.train[9][1] == 2


@pytest.mark.parametrize("length,world", [(359, 1), (359, 2), (359, 3), (10, 4), (2, 3)])
def test_shard_sampler_counts_each_index_once(length, world):
    seen = [i for r in range(world) for i in ShardSampler(length, world, r)]
    assert sorted(seen) == list(range(length))


def test_resumable_sampler_skips_consumed_prefix():
    ds = list(range(103))
    full = ResumableDistributedSampler(ds, 2, 1, seed=3)
    full.set_epoch(4)
    order = list(full)
    assert len(order) == 51
    part = ResumableDistributedSampler(ds, 2, 1, seed=3)
    part.set_epoch(4)
    part.set_start_index(20)
    assert list(part) == order[20:] and len(part) == 31
    full.set_epoch(5)
    assert list(full) != order  # reshuffled per epoch


def test_epoch_seeded_augmentation_is_deterministic_and_leaves_rng_alone():
    base = build_datasets("digits").train
    ds = EpochSeeded(base, seed=1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = ds[7][0]
    assert torch.equal(torch.get_rng_state(), before)
    _ = ds[8]
    assert torch.equal(ds[7][0], a)  # independent of what was drawn before
    ds.set_epoch(1)
    assert not torch.equal(ds[7][0], a)  # a new epoch, a new augmentation


def _load_cifar(data_dir: str, queue) -> None:
    from fastnet.data import build_datasets as build

    s = build("cifar10", data_dir)
    queue.put((len(s.train), s.test.images.sum().item(), s.test.labels.tolist()))


def test_concurrent_extraction_by_three_ranks_yields_one_valid_dataset(tmp_path):
    """Three processes meet an unextracted tarball at once: one extracts (under a file lock, into a
    temporary name, then renamed), the others wait and read the finished directory."""
    import multiprocessing as mp

    src = tmp_path / "src"
    expected = write_cifar_batches(src)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_cifar, args=(str(data_dir), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    test_data, test_labels = expected["test_batch"]
    assert results == [(20, int(test_data.astype(np.int64).sum()), test_labels)] * 3
    leftovers = sorted(p.name for p in data_dir.iterdir())
    assert leftovers == ["cifar-10-batches-py", "cifar-10-batches-py.lock", "cifar-10-python.tar.gz"]


def test_hold_out_is_fixed_disjoint_and_unaugmented():
    from fastnet.data import hold_out

    splits = build_datasets("digits")
    train, val = hold_out(splits, 200)
    again, val2 = hold_out(build_datasets("digits"), 200)
    assert len(train) == 1438 - 200 and len(val) == 200
    assert torch.equal(val.images, val2.images)  # the same images for every run and rank
    rows = {img.numpy().tobytes() for img in splits.train.images}
    assert {img.numpy().tobytes() for img in val.images} <= rows
    assert not {img.numpy().tobytes() for img in val.images} & {img.numpy().tobytes() for img in train.images}
    assert val.transform is splits.test.transform and train.transform is splits.train.transform
    with pytest.raises(ValueError, match="Invalid val_samples: 1438"):
        hold_out(splits, 1438)
    with pytest.raises(ValueError, match="needs a dataset held in memory"):
        hold_out(build_datasets("synthetic", image_size=8, synthetic_samples=16), 4)


def test_sampler_block_1_is_distributed_samplers_shard():
    from torch.utils.data import DistributedSampler

    from fastnet.data import ResumableDistributedSampler

    data = list(range(103))
    for world in (1, 2, 3):
        for rank in range(world):
            s = ResumableDistributedSampler(data, world, rank, seed=5)
            s.set_epoch(2)
            ref = DistributedSampler(data, world, rank, shuffle=True, seed=5, drop_last=True)
            ref.set_epoch(2)
            assert list(s) == list(ref)


@given(n=st.integers(40, 300), micro=st.integers(1, 8), accum=st.integers(1, 3), world=st.integers(1, 4),
       other=st.integers(1, 4), steps_done=st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_sampler_steps_take_the_same_micro_batches_on_any_world_size(n, micro, accum, world, other, steps_done):
    """Step k = the same micro-batches of the epoch's permutation whatever the world size (for one global
    batch), also after resuming at step ``steps_done`` on another world size."""
    from fastnet.data import ResumableDistributedSampler

    data = list(range(n))
    batch = world * micro * accum
    assume(n >= batch and batch % (other * micro) == 0)  # the same global batch must divide on the other size

    def micro_batches(w: int, skip_steps: int) -> list[list[tuple[int, ...]]]:
        a = batch // (w * micro)
        shards = []
        for r in range(w):
            s = ResumableDistributedSampler(data, w, r, seed=1, block_size=micro)
            s.set_epoch(3)
            s.set_start_index(skip_steps * a * micro)
            shards.append(list(s))
        steps = len(shards[0]) // (a * micro)
        return [sorted(tuple(sh[(k * a + i) * micro:(k * a + i + 1) * micro]) for sh in shards for i in range(a))
                for k in range(steps)]

    assert micro_batches(world, steps_done) == micro_batches(other, steps_done)
    assert micro_batches(world, 0)[steps_done:] == micro_batches(other, steps_done)


def test_cifar10_present_knows_every_layout(tmp_path):
    from fastnet.data import cifar10_present

    assert not cifar10_present(tmp_path)
    packed = tmp_path / "p" / "cifar-10-jpeg-packed"
    packed.mkdir(parents=True)
    (packed / "train.npz").touch()
    assert not cifar10_present(tmp_path / "p")  # test.npz missing
    (packed / "test.npz").touch()
    assert cifar10_present(tmp_path / "p") and cifar10_present(packed)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "cifar-10-python.tar.gz").touch()
    assert cifar10_present(tmp_path / "t")


def test_digits_from_an_exported_file_equal_scikit_learns(tmp_path, monkeypatch):
    """digits.npz (for the GPU image, which lacks scikit-learn) gives the same splits, bit for bit;
    without scikit-learn and without the file the error says both ways out."""
    import builtins

    from fastnet.data import build_datasets, export_digits

    export_digits(str(tmp_path))
    a, b = build_datasets("digits"), build_datasets("digits", str(tmp_path))
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    assert torch.equal(build_datasets("digits", str(tmp_path)).train.images, a.train.images)
    with pytest.raises(RuntimeError, match="scikit-learn .* or a digits.npz"):
        build_datasets("digits")


def test_child_processes_keep_fastnet_kernels_only(monkeypatch):
    """FASTNET_KERNELS (no trainer option) reaches the GPU tests' trainer runs; option variables do not."""
    from tests.conftest import child_env

    monkeypatch.setenv("FASTNET_KERNELS", "1")
    monkeypatch.setenv("FASTNET_EPOCHS", "7")
    env = child_env()
    assert env["FASTNET_KERNELS"] == "1" and "FASTNET_EPOCHS" not in env


def _image_tree(root, classes=("cat", "dog"), per_class=3, size=20):
    from PIL import Image

    for split in ("train", "val"):
        for i, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (size, size), (40 * i + k, 100, 200)).save(root / split / c / f"{k}.png")
    return root


def test_imagefolder_reads_any_train_val_tree_with_imagenets_transforms(tmp_path):
    from fastnet.data import build_datasets

    splits = build_datasets("imagefolder", str(_image_tree(tmp_path / "pets")), 32)
    assert splits.num_classes == 2 and splits.image_size == 32 and len(splits.train) == 6
    x, y = splits.test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0


def test_imagefolder_errors_name_the_folder(tmp_path):
    from fastnet.data import build_datasets

    with pytest.raises(ValueError, match="imagefolder not found in data_dir .*train/<class>"):
        build_datasets("imagefolder", str(tmp_path))
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="train holds no images"):
        build_datasets("imagefolder", str(tmp_path))


@pytest.mark.slow
def test_trainer_runs_a_torchvision_model_on_an_image_folder(tmp_path):
    from tests.conftest import run_trainer

    data = _image_tree(tmp_path / "pets", per_class=4)
    res = run_trainer(["--dataset", "imagefolder", "--data-dir", str(data), "--model", "mobilenet_v3_small",
                       "--image-size", "32", "--global-batch-size", "4", "--micro-batch-size", "4", "--epochs", "1",
                       "--workers", "0", "--progress", "none", "--out-dir", str(tmp_path / "run")])
    assert res.returncode == 0, res.stderr
    assert "best top-1" in res.stderr
