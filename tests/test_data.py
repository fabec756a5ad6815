"""Episode sampler invariants, the procedural data set, and the real loaders on fixtures
written in the real on-disk formats."""
import csv
import os
import pickle
import time

import numpy as np
import pytest
import torch

from qgnn_deploy.config import preset_config
from qgnn_deploy.data import calibration_episodes, episode_batches, get_dataset, sample_tasks
from qgnn_deploy.data import synthetic
from qgnn_deploy.data.safe_pickle import safe_load
from qgnn_deploy.errors import DataError

CFG = preset_config("tiny")


# ---------------------------------------------------------------- sampler

def test_episode_shapes_and_labels():
    cfg = preset_config("tiny", shot=2)
    ds = get_dataset("synthetic")
    batches = list(episode_batches(cfg, 23, seed=3, split="test", dataset=ds, tasks_per_batch=10))
    assert [b[0].shape[0] for b in batches] == [10, 10, 3]
    for images, support, query in batches:
        t = images.shape[0]
        assert images.shape == (t, cfg.num_nodes, 3, 32, 32) and images.dtype == torch.float32
        assert support.dtype == torch.int64 and support.shape == (t, 10)
        assert query.dtype == torch.int64 and query.shape == (t, 5)
        # supports class-major, queries one per class
        assert torch.equal(support, torch.arange(5).repeat_interleave(2).expand(t, -1))
        assert torch.equal(query.sort(1).values, torch.arange(5).expand(t, -1))
    idx = sample_tasks(ds.split_classes("test"), ds.class_sizes("test"), 5, 2, 3, "test", 0, 50)
    labels = torch.cat([idx.support_labels, idx.query_labels], 1)
    for t in range(50):
        cls_of = {}
        for node in range(cfg.num_nodes):
            cls_of.setdefault(int(labels[t, node]), set()).add(int(idx.classes[t, node]))
        assert all(len(v) == 1 for v in cls_of.values())          # one class per label
        assert len({next(iter(v)) for v in cls_of.values()}) == 5  # five distinct classes
        pairs = set(zip(idx.classes[t].tolist(), idx.instances[t].tolist()))
        assert len(pairs) == cfg.num_nodes                         # no image twice in a task
        assert set(idx.classes[t].tolist()) <= set(ds.split_classes("test"))


def test_deterministic_and_batch_independent():
    a = list(episode_batches(CFG, 12, seed=7, split="val", tasks_per_batch=12))[0]
    b = list(episode_batches(CFG, 12, seed=7, split="val", tasks_per_batch=5))
    for x, y in zip(a, [torch.cat(z) for z in zip(*b)]):
        assert torch.equal(x, y)
    c = next(episode_batches(CFG, 12, seed=8, split="val", tasks_per_batch=12))
    assert not torch.equal(a[0], c[0])
    start = next(episode_batches(CFG, 2, seed=7, split="val", start=10))
    assert torch.equal(start[0], a[0][10:12])


def test_splits_disjoint_and_sized():
    ds = get_dataset("synthetic")
    tr, va, te = (set(ds.split_classes(s)) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (64, 16, 20)
    assert not (tr & va or tr & te or va & te)


def test_calibration_episodes():
    images, support = calibration_episodes(CFG, tasks=4, seed=0)
    assert images.shape == (4, 10, 3, 32, 32) and support.shape == (4, 5)
    again, _ = calibration_episodes(CFG, tasks=4, seed=0)
    assert torch.equal(images, again)
    assert abs(float(images.mean())) < 0.5 and 0.5 < float(images.std()) < 2.0


# ---------------------------------------------------------------- procedural data set

def test_synthetic_fast_and_deterministic():
    # CPU time, single thread, best of 3 (the first call pays for warm-up): wall time on a
    # shared machine says more about the neighbours than about the generator.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for seed in range(3):
            t0 = time.process_time()
            images, _, _ = next(episode_batches(CFG, 10, seed=seed, split="train"))
            times.append(time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)
    assert min(times) < 0.5  # ~0.04 s on an idle core
    assert torch.isfinite(images).all()
    x = synthetic.render(0, torch.tensor([3, 3, 5]), torch.tensor([1, 1, 1]))
    assert torch.equal(x[0], x[1]) and not torch.equal(x[0], x[2])
    big = synthetic.render(0, torch.tensor([3]), torch.tensor([1]), size=84)
    assert big.shape == (1, 3, 84, 84)
    cfg84 = preset_config("tiny", image_size=84)
    assert next(episode_batches(cfg84, 2, seed=0))[0].shape == (2, 10, 3, 84, 84)


def test_synthetic_classes_differ_more_than_instances():
    """Within-class pixel distance is smaller than between-class distance on average,
    but instances do vary (not copies)."""
    cls = torch.arange(80, 100).repeat_interleave(6)
    inst = torch.arange(6).repeat(20)
    x = synthetic.render(0, cls, inst).flatten(1)
    d = torch.cdist(x, x)
    same = cls[:, None] == cls[None, :]
    off = ~torch.eye(len(cls), dtype=torch.bool)
    within, between = d[same & off].mean(), d[~same].mean()
    assert within > 0.3 * between      # real intra-class variation
    assert within < between            # but classes are distinct


# ---------------------------------------------------------------- CIFAR-FS fixture

def _write_cifar(root, n_classes=12, per_split=(3, 2)):
    arch = root / "cifar-100-python"
    arch.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"class_{i}".encode() for i in range(n_classes)]
    for part, n in (("train", per_split[0]), ("test", per_split[1])):
        labels = [c for c in range(n_classes) for _ in range(n)]
        d = {b"batch_label": b"fixture", b"fine_labels": labels, b"coarse_labels": [0] * len(labels),
             b"filenames": [b"x.png"] * len(labels),
             b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)}
        with open(arch / part, "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(arch / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": names, b"coarse_label_names": [b"c"]}, f, protocol=2)
    sp = root / "splits"
    sp.mkdir()
    for s, rng_ in (("train", range(0, 6)), ("val", range(6, 9)), ("test", range(9, 12))):
        (sp / f"{s}.txt").write_text("\n".join(f"class_{i}" for i in rng_) + "\n")
    return root


def test_cifar_fs_loader(tmp_path):
    root = _write_cifar(tmp_path)
    ds = get_dataset("cifar-fs", str(root), 32)
    assert ds.class_sizes("train") == [5] * 6 and len(ds.split_classes("test")) == 3
    cfg = preset_config("tiny", way=3)
    images, support, query = next(episode_batches(cfg, 4, seed=0, split="test", dataset=ds))
    assert images.shape == (4, 6, 3, 32, 32)
    # pixel content is the archive's: class 9 images equal the raw bytes, normalised
    raw = safe_load(str(root / "cifar-100-python" / "train"))
    first9 = np.asarray(raw[b"data"])[np.asarray(raw[b"fine_labels"]) == 9][0]
    x = ds.load(torch.tensor([9]), torch.tensor([0]))[0]
    back = (x * ds.std[0] + ds.mean[0]) * 255
    assert np.allclose(back.numpy(), first9.reshape(3, 32, 32), atol=1e-3)


def test_cifar_fs_errors(tmp_path):
    with pytest.raises(DataError, match="cifar-100-python"):
        get_dataset("cifar-fs", str(tmp_path), 32)
    root = _write_cifar(tmp_path / "d")
    os.remove(root / "splits" / "val.txt")
    with pytest.raises(DataError, match="val.txt"):
        get_dataset("cifar-fs", str(root), 32)
    with pytest.raises(DataError, match="--data-dir"):
        get_dataset("cifar-fs", None, 32)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code(tmp_path):
    p = tmp_path / "evil"
    with open(p, "wb") as f:
        pickle.dump({b"data": _Evil()}, f, protocol=2)
    with pytest.raises(DataError, match="not allowed"):
        safe_load(str(p))
    (tmp_path / "trunc").write_bytes(b"\x80\x02}q\x00")
    with pytest.raises(DataError):
        safe_load(str(tmp_path / "trunc"))


# ---------------------------------------------------------------- miniImageNet fixtures

def _class_names(n):
    return [f"n{10000000 + i}" for i in range(n)]


def test_mini_imagenet_pickles(tmp_path):
    rng = np.random.default_rng(1)
    names = _class_names(9)
    sd = tmp_path / "compacted_datasets"
    sd.mkdir()
    for s, cls in (("train", names[:5]), ("val", names[5:7]), ("test", names[7:])):
        if s == "val":  # the {"data", "labels"} variant
            labels = [c for c in cls for _ in range(4)]
            obj = {"data": rng.integers(0, 256, (len(labels), 84, 84, 3), dtype=np.uint8), "labels": labels}
        else:           # {class: [images]}
            obj = {c: [rng.integers(0, 256, (84, 84, 3), dtype=np.uint8) for _ in range(4)] for c in cls}
        with open(sd / f"mini_imagenet_{s}.pickle", "wb") as f:
            pickle.dump(obj, f)
    ds = get_dataset("mini-imagenet", str(tmp_path), 84)
    assert [len(ds.split_classes(s)) for s in ("train", "val", "test")] == [5, 2, 2]
    cfg = preset_config("tiny", way=2, image_size=84)
    images, _, _ = next(episode_batches(cfg, 2, seed=0, split="val", dataset=ds))
    assert images.shape == (2, 4, 3, 84, 84)


def _jpg(path, rng, size=40):
    from PIL import Image
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)


def test_mini_imagenet_csv(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "images").mkdir()
    names = _class_names(7)
    for s, cls in (("train", names[:3]), ("val", names[3:5]), ("test", names[5:])):
        with open(tmp_path / f"{s}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            for c in cls:
                for i in range(3):
                    fn = f"{c}{i:08d}.jpg"
                    _jpg(tmp_path / "images" / fn, rng)
                    w.writerow([fn, c])
    ds = get_dataset("mini-imagenet", str(tmp_path), 32)
    cfg = preset_config("tiny", way=2)
    images, _, _ = next(episode_batches(cfg, 3, seed=0, split="test", dataset=ds))
    assert images.shape == (3, 4, 3, 32, 32) and torch.isfinite(images).all()
    (tmp_path / "val.csv").write_text("file,class\nx.jpg,a\n")
    with pytest.raises(DataError, match="filename,label"):
        get_dataset("mini-imagenet", str(tmp_path), 32)


def test_mini_imagenet_missing(tmp_path):
    with pytest.raises(DataError, match="mini_imagenet_"):
        get_dataset("mini-imagenet", str(tmp_path), 84)


# ---------------------------------------------------------------- CUB fixture

def test_cub_loader(tmp_path):
    rng = np.random.default_rng(3)
    img = tmp_path / "CUB_200_2011" / "images"
    classes = [f"{i + 1:03d}.Bird_{i}" for i in range(8)]
    for c in classes:
        (img / c).mkdir(parents=True)
        for k in range(3):
            _jpg(img / c / f"{c}_{k}.jpg", rng, size=50)
    ds = get_dataset("cub", str(tmp_path), 84)
    assert [len(ds.split_classes(s)) for s in ("train", "val", "test")] == [4, 2, 2]
    assert {ds.class_names[c] for c in ds.split_classes("val")} == {classes[1], classes[5]}
    cfg = preset_config("tiny", way=2, image_size=84)
    images, _, _ = next(episode_batches(cfg, 2, seed=0, split="test", dataset=ds))
    assert images.shape == (2, 4, 3, 84, 84)
    with pytest.raises(DataError, match="CUB_200_2011/images"):
        get_dataset("cub", str(tmp_path / "nope"), 84)
