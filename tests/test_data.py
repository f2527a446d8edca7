import pickle

import lightning as L
import numpy as np
import pytest
import torch

from conftest import RunsACommand, transformed, write_cifar_batch
from resnet_lab.data import CIFAR10DataModule, CIFAR100DataModule, SyntheticDataModule
from resnet_lab.data.base import split_indices
from resnet_lab.errors import ConfigError, DataError, DatasetNotFoundError


def make_cifar(root, **kwargs) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(root=str(root), batch_size=8, num_workers=0, download=False, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_cifar_split_is_fixed_disjoint_and_complete(cifar_root):
    dm = make_cifar(cifar_root, val_size=50)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (150, 50, 40)
    train_idx, val_idx = split_indices(200, 50, seed=0)
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(200))
    assert torch.equal(split_indices(200, 50, seed=0)[1], val_idx)
    assert not torch.equal(split_indices(200, 50, seed=1)[1], val_idx)
    # The validation images are exactly the held-out training images, in file order.
    images = np.concatenate([_read(cifar_root, i) for i in range(1, 6)])
    assert torch.equal(dm.val_set.images, torch.from_numpy(images)[val_idx])


def _read(root, i):
    import pickle

    with open(root / "cifar-10-batches-py" / f"data_batch_{i}", "rb") as f:
        return pickle.load(f, encoding="bytes")[b"data"].reshape(-1, 3, 32, 32)


def test_cifar_pixel_mean_comes_from_the_train_split(cifar_root):
    dm = make_cifar(cifar_root, val_size=50)
    expected = dm.train_set.images.float().div(255).mean(0)
    torch.testing.assert_close(dm.normalize.mean, expected)
    # Evaluation applies only the mean subtraction: every validation image is recovered exactly.
    raw, images, labels = transformed(dm, dm.val_dataloader())[0]
    torch.testing.assert_close(images + expected, raw.float() / 255)
    assert torch.equal(raw, dm.val_set.images[:8]) and torch.equal(labels, dm.val_set.labels[:8])
    channel = make_cifar(cifar_root, val_size=50, normalization="channel")
    _, x, _ = transformed(channel, channel.val_dataloader())[0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32


@pytest.mark.parametrize("loader", ["device", "dataloader"])
def test_cifar_augmentation_is_pad_crop_flip_on_both_loaders(cifar_root, loader):
    dm = make_cifar(cifar_root, val_size=50, loader=loader)
    seen_shift, seen_flip = set(), False
    for raw, images, _ in transformed(dm, dm.train_dataloader()):
        for source, out in zip(raw, images + dm.normalize.mean, strict=True):
            padded = torch.nn.functional.pad(source.float() / 255, (4, 4, 4, 4))
            # Each output is a 32x32 window of the 4-pixel-padded image, possibly mirrored.
            hits = [
                (dy, dx, flip)
                for flip in (False, True)
                for dy in range(9)
                for dx in range(9)
                if torch.allclose(padded[:, dy : dy + 32, dx : dx + 32], out.flip(-1) if flip else out, atol=1e-6)
            ]
            assert hits, "not a window of the padded image"
            seen_shift.add(hits[0][:2])
            seen_flip |= hits[0][2]
    assert len(seen_shift) > 20 and seen_flip


def test_an_augmentation_named_in_the_config_takes_effect_on_both_loaders(cifar_root):
    # No augmentation at all: training batches are the stored images, normalised.
    for loader in ("device", "dataloader"):
        dm = make_cifar(cifar_root, val_size=50, loader=loader, augmentations=[])
        for raw, images, _ in transformed(dm, dm.train_dataloader()):
            torch.testing.assert_close(images + dm.normalize.mean, raw.float() / 255)


def test_both_loaders_give_identical_training_batches(cifar_root):
    device, host = (make_cifar(cifar_root, val_size=50, loader=loader) for loader in ("device", "dataloader"))
    loaders = {dm: dm.train_dataloader() for dm in (device, host)}
    firsts = []
    for epoch in (0, 1):
        for loader in loaders.values():
            loader.sampler.set_epoch(epoch)
        a, b = (transformed(dm, loader) for dm, loader in loaders.items())
        assert len(a) == len(b) == 18
        firsts.append(a[0][1])
        for (_, x1, y1), (_, x2, y2) in zip(a, b, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(*firsts)  # a new order and new draws each epoch


def test_cifar_loaders_keep_the_batch_size(cifar_root):
    dm = make_cifar(cifar_root, val_size=50)
    x, y, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,) and y.dtype == torch.int64
    assert len(dm.train_dataloader()) == 150 // 8


def test_cifar_val_size_zero_validates_on_the_test_set(cifar_root):
    dm = make_cifar(cifar_root, val_size=0)
    assert len(dm.train_set) == 200 and dm.val_set is dm.test_set


def test_missing_cifar_folder_says_where_it_looked(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DatasetNotFoundError, match=r"looked for .*nowhere/cifar-10-batches-py.*--data.root"):
        dm.prepare_data()


def test_root_defaults_to_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNET_LAB_DATA", str(tmp_path))
    assert CIFAR10DataModule().data_dir == tmp_path / "cifar-10-batches-py"


def test_truncated_batch_names_the_file(cifar_root):
    path = cifar_root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR batch"):
        make_cifar(cifar_root, val_size=50)


def test_wrong_shapes_and_labels_are_rejected(cifar_root):
    folder = cifar_root / "cifar-10-batches-py"
    write_cifar_batch(folder / "test_batch", np.zeros((4, 3, 32, 32), np.uint8), [0, 1, 2, 10])
    with pytest.raises(DataError, match=r"labels must lie in \[0, 10\), found 0..10"):
        make_cifar(cifar_root, val_size=50)
    write_cifar_batch(folder / "test_batch", np.zeros((4, 3, 16, 16), np.uint8), [0, 1, 2, 3])
    with pytest.raises(DataError, match=r"expected data of shape \[N, 3072\]"):
        make_cifar(cifar_root, val_size=50)


def test_bad_split_size(cifar_root):
    with pytest.raises(ConfigError, match="val_size must be in"):
        make_cifar(cifar_root, val_size=500)


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for name, n in (("train", 60), ("test", 20)):
        written[name] = [int(x) for x in rng.integers(0, 100, n)]
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        write_cifar_batch(folder / name, images, written[name], b"fine_labels")
    dm = CIFAR100DataModule(root=str(tmp_path), val_size=10, batch_size=4, num_workers=0, download=False)
    dm.setup("fit")
    assert dm.num_classes == 100 and len(dm.train_set) == 50
    assert dm.test_set.labels.tolist() == written["test"]  # the fine labels, in file order
    assert sorted(dm.train_set.labels.tolist() + dm.val_set.labels.tolist()) == sorted(written["train"])


def test_synthetic_data_is_deterministic_and_class_dependent():
    a, b = SyntheticDataModule(train_size=64, val_size=16), SyntheticDataModule(train_size=64, val_size=16)
    a.setup("fit"), b.setup("fit")
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert len(a.train_set) == 64 and len(a.val_set) == len(a.test_set) == 16
    # Class-dependent: the nearest class-mean image of the training set names most validation images' class.
    train, val = a.train_set, a.val_set
    means = torch.stack([train.images[train.labels == c].float().mean(0) for c in range(10)])
    nearest = torch.cdist(val.images.float().flatten(1), means.flatten(1)).argmin(1)
    assert (nearest == val.labels).float().mean() > 0.8
    _, x, y = transformed(a, a.val_dataloader())[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and torch.equal(y, val.labels)


def test_real_cifar10_loads_with_official_statistics(shared_data):
    dm = CIFAR10DataModule(root=str(shared_data), batch_size=128, num_workers=0, download=False)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (45000, 5000, 10000)
    images = torch.cat([dm.train_set.images, dm.val_set.images]).float().div(255)
    mean = images.mean(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=1e-3, rtol=0)
    counts = torch.bincount(torch.cat([dm.train_set.labels, dm.val_set.labels]), minlength=10)
    assert counts.tolist() == [5000] * 10


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(cifar_root):
    data = CIFAR10DataModule(root=str(cifar_root), batch_size=128, val_size=40, num_workers=0, download=False)
    data.trainer = L.Trainer(accelerator="cpu", devices=3, strategy="ddp", logger=False)  # not launched: 3 ranks
    with pytest.raises(
        ConfigError, match=r"batch_size 128 is the global batch .* 3 processes .* --data.batch_size 129"
    ):
        _ = data.process_batch_size
    data.batch_size = 129
    assert data.process_batch_size == 43


def test_a_batch_file_that_would_run_code_is_refused_and_runs_nothing(cifar_root, tmp_path):
    import pickle

    marker = tmp_path / "ran"
    path = cifar_root / "cifar-10-batches-py" / "data_batch_2"
    with path.open("rb") as f:
        entry = pickle.load(f, encoding="bytes")
    with path.open("wb") as f:
        pickle.dump({**entry, b"extra": RunsACommand(marker)}, f)
    with pytest.raises(DataError, match=r"data_batch_2 is not a plain CIFAR batch .*(posix|os)\.system"):
        make_cifar(cifar_root, val_size=50)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_batches_of_any_pickle_protocol_load(cifar_root, protocol):
    path = cifar_root / "cifar-10-batches-py" / "data_batch_4"
    with path.open("rb") as f:
        entry = pickle.load(f, encoding="bytes")
    with path.open("wb") as f:
        pickle.dump(entry, f, protocol=protocol)
    dm = make_cifar(cifar_root, val_size=50)
    assert len(dm.train_set) == 150


def test_both_families_take_the_same_augmentations_and_mixing_and_apply_them_alike(cifar_root, imagenet_root):
    from torchvision.transforms import v2

    from resnet_lab.data import (
        BatchTransforms,
        EachImage,
        ImageNetDataModule,
        InceptionAugmentation,
        MixBatch,
        PadCropFlip,
    )
    from resnet_lab.data.augmentations import NO_AUGMENTATION

    def stack() -> dict:
        return dict(augmentations=[PadCropFlip(4), EachImage(v2.RandAugment())], mixing=MixBatch(v2.MixUp(alpha=1.0)))

    cifar = make_cifar(cifar_root, val_size=50, normalization="imagenet", **stack())
    # ImageNet's crops and flips in the workers, nothing of its recipe left for the device: only the stack.
    imagenet = ImageNetDataModule(root=str(imagenet_root), batch_size=8, crop_size=32, val_resize=36, num_workers=0,
                                  train_augmentation=InceptionAugmentation(), **stack())  # fmt: skip
    imagenet.num_classes = 10  # as many classes as CIFAR's labels, for mixing the same labels
    raw, labels, key = next(iter(cifar.train_dataloader()))
    a, b = (dm.on_after_batch_transfer((raw, labels, key), 0) for dm in (cifar, imagenet))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[1].shape == (8, 10)
    # What each did is the stack itself: the augmentations, the normalisation, then the mixing.
    expected = BatchTransforms(**stack(), normalize=imagenet.normalize, num_classes=10)(raw, labels, key)
    assert torch.equal(a[0], expected[0]) and torch.equal(a[1], expected[1])
    unmixed, _ = BatchTransforms(stack()["augmentations"], imagenet.normalize, 10)(raw, labels, key)
    plain, _ = BatchTransforms([], imagenet.normalize, 10)(raw, labels, key)
    assert not torch.equal(a[0], unmixed) and not torch.equal(unmixed, plain)  # each part changed the batch
    # An evaluation batch is only normalised, by both.
    a, b = (dm.on_after_batch_transfer((raw, labels, NO_AUGMENTATION), 0) for dm in (cifar, imagenet))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], labels)


class Noise(torch.utils.data.Dataset):
    """Item i: a uint8 image drawn from torch's global generator (as torchvision's random transforms draw), label i."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8), index


def test_each_image_is_drawn_from_its_key_and_place_whichever_process_makes_it():
    from resnet_lab.data.base import KeyedSamples

    indices = torch.arange(8)
    whole, labels, key = KeyedSamples(Noise())[(11, indices)]
    assert key == 11 and torch.equal(labels, indices) and len(whole.unique(dim=0)) == 8
    shares = [KeyedSamples(Noise(), rank, 2)[(11, indices[rank::2])][0] for rank in (0, 1)]
    assert torch.equal(torch.stack(shares, dim=1).flatten(0, 1), whole)  # images rank::2 of the global batch
    assert not torch.equal(KeyedSamples(Noise())[(12, indices)][0], whole)  # another batch's key, other draws
    state = torch.get_rng_state()
    KeyedSamples(Noise())[(11, indices)]
    assert torch.equal(torch.get_rng_state(), state)  # the training process's own stream is left as it was


def test_the_dataloader_resumes_after_the_batches_training_took_not_those_its_workers_fetched():
    from resnet_lab.data.augmentations import batch_key
    from resnet_lab.data.base import BatchOrder, KeyedSamples, batch_loader

    def loader() -> torch.utils.data.DataLoader:
        return batch_loader(KeyedSamples(Noise()), BatchOrder(64, 8, True, seed=5), num_workers=2)

    never_stopped = loader()
    never_stopped.sampler.set_epoch(1)
    expected = list(never_stopped)
    stopped = loader()
    batches = iter(stopped)  # as Lightning does: the iterator first, then the epoch
    stopped.sampler.set_epoch(1)
    taken = [next(batches) for _ in range(3)]
    state = stopped.state_dict()
    assert state == {"epoch": 1, "position": 3, "seed": 5, "global_batch": 8, "size": 64}  # the workers fetched more
    assert [key for _, _, key in taken] == [batch_key(5, 1, b) for b in range(3)]
    resumed = loader()
    resumed.load_state_dict(state)
    batches = iter(resumed)
    resumed.sampler.set_epoch(1)
    rest = list(batches)
    assert len(rest) == len(expected) - 3
    for (images, labels, key), (images_, labels_, key_) in zip(rest, expected[3:], strict=True):
        assert key == key_ and torch.equal(labels, labels_) and torch.equal(images, images_)
    resumed.sampler.set_epoch(2)
    assert len(list(resumed)) == len(expected)  # the next epoch is whole


def test_a_checkpoint_before_an_epoch_s_first_batch_resumes_the_whole_epoch_and_any_split_of_the_global_batch():
    from resnet_lab.data.augmentations import batch_key
    from resnet_lab.data.base import BatchOrder

    def keys(order: BatchOrder) -> list[int]:
        return [key for key, _ in order]

    order = BatchOrder(64, 8, True, seed=5)
    list(order.taken(iter(order)))  # a whole epoch trained
    order.set_epoch(1)  # e.g. a SIGTERM at the next epoch's start, before its first batch
    fresh = BatchOrder(64, 8, True, seed=5)
    fresh.load_state_dict(order.state_dict())
    fresh.set_epoch(1)
    assert keys(fresh) == [batch_key(5, 1, b) for b in range(8)]
    # 2 processes of 4 images, stopped after 3 global batches, resumed on 1 process of 8: the same next batches.
    shares = [BatchOrder(64, 4, True, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for share in shares:
        share.set_epoch(1)
        batches = share.taken(iter(share))
        [next(batches) for _ in range(3)]
    one = BatchOrder(64, 8, True, seed=5)
    one.load_state_dict(shares[0].state_dict())
    one.set_epoch(1)
    resumed = list(one)
    assert [key for key, _ in resumed] == [batch_key(5, 1, b) for b in range(3, 8)]
    expected = BatchOrder(64, 8, True, seed=5)
    expected.set_epoch(1)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, list(expected)[3:], strict=True))
    other = BatchOrder(64, 16, True, seed=5)  # another global batch: other batches, the epoch afresh
    other.load_state_dict(shares[0].state_dict())
    other.set_epoch(1)
    assert len(list(other)) == 4


def test_a_fork_s_data_module_gets_its_evaluation_batches_normalised_as_its_training_ones():
    from resnet_lab.data import ClassificationDataModule
    from resnet_lab.data.augmentations import Standardize

    class Fork(ClassificationDataModule):
        num_classes, input_size = 10, 4

        def setup(self, stage=None) -> None:
            self.train_set = self.val_set = self.test_set = Noise()
            self.normalize = Standardize(torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25))

    dm = Fork(batch_size=8, num_workers=0)
    dm.setup()
    train = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)[0]
    val = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)[0]
    assert train.dtype == val.dtype == torch.float32 and abs(val.mean().item()) < 0.2  # both on the model's scale
    with pytest.raises(TypeError, match="Old.train_sampler is no longer a hook.*train_order"):

        class Old(Fork):
            def train_sampler(self, dataset):
                return None
