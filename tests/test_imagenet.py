import logging
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.io import write_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from conftest import CONFIGS, IMAGENETTE_WNIDS, QUIET, quiet_trainer, transformed
from resnet_lab import CifarResNet, ImageClassifier
from resnet_lab.data import (
    EachImage,
    ImageNetDataModule,
    InceptionAugmentation,
    PaperAugmentation,
    PCALighting,
    TorchvisionRecipeAugmentation,
)
from resnet_lab.data.augmentations import batch_key
from resnet_lab.data.base import run_seed
from resnet_lab.data.ilsvrc_val import build_class_folders
from resnet_lab.data.ilsvrc_val import main as ilsvrc_val_main
from resnet_lab.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_MEAN_PIXEL,
    IMAGENET_STD,
    PCA_EIGVAL,
    PCA_EIGVEC,
    MultiScaleViews,
    TenCropViews,
    imagenet_class_names,
    read_rgb,
)
from resnet_lab.errors import DataError, DatasetNotFoundError

SMALL = dict(batch_size=4, crop_size=32, train_augmentation=PaperAugmentation((36, 48)), val_resize=36, num_workers=0)
MEAN, STD = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]


def datamodule(root: Path, **kwargs) -> ImageNetDataModule:
    dm = ImageNetDataModule(root=str(root), **{**SMALL, **kwargs})
    dm.setup("fit")
    return dm


def test_folders_give_sorted_classes_names_and_labels(imagenet_root):
    dm = datamodule(imagenet_root)
    assert dm.classes == sorted(IMAGENETTE_WNIDS[:6]) and dm.num_classes == 6
    assert dm.class_names[0] == "tench, Tinca tinca"
    assert len(dm.train_set) == 24 and len(dm.val_set) == 12
    for path, label in dm.train_set.samples:
        assert Path(path).parent.name == dm.classes[label]
    names = imagenet_class_names()
    assert len(names) == 1000 and list(names)[:2] == ["n01440764", "n01443537"]


def test_paper_augmentation_shapes_ranges_and_scale_range(imagenet_root):
    dm = datamodule(imagenet_root, train_augmentation=PaperAugmentation((36, 60)))
    image, label = dm.train_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and 0 <= label < 6  # the workers' crop
    resize = dm.train_transform().transforms[0]
    source = read_rgb(dm.train_set.samples[0][0])  # 40x48
    sides = {min(resize(source).shape[-2:]) for _ in range(400)}
    assert min(sides) >= 36 and max(sides) <= 60 and len(sides) > 15
    assert min(sides) <= 38 and max(sides) >= 58  # the whole range is used


def test_inception_augmentation(imagenet_root):
    dm = datamodule(imagenet_root, train_augmentation=InceptionAugmentation((0.5, 0.5)))
    image, _ = dm.train_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert dm.data_augmentations() == []  # nothing left for the device but the normalisation
    crop = dm.train_transform().transforms[0]
    params = [crop.make_params([read_rgb(dm.train_set.samples[0][0])]) for _ in range(50)]
    areas = {round(p["height"] * p["width"] / (40 * 48), 1) for p in params}
    assert areas == {0.5}


def test_ten_crop_scores_are_the_average_of_the_ten_views(imagenet_root):
    dm = datamodule(imagenet_root, eval_mode="ten_crop")
    raw, images, labels = transformed(dm, dm.val_dataloader())[0]
    assert raw.shape == images.shape == (4, 10, 3, 32, 32) and raw.dtype == torch.uint8
    model = ImageClassifier(CifarResNet(8, num_classes=6)).eval()
    with torch.no_grad():
        averaged = model.view_averaged_log_probs(images).exp()
        for i, (path, _) in enumerate(dm.val_set.samples[:4]):
            resized = TF.resize(read_rgb(path), [36], antialias=True)
            crops = TF.ten_crop(resized, [32, 32])
            views = torch.stack([(c.float() / 255 - MEAN) / STD for c in crops])
            expected = model(views).softmax(1).mean(0)
            torch.testing.assert_close(averaged[i], expected, atol=1e-5, rtol=1e-4)


def test_multi_scale_runs_whole_images_at_every_scale_and_flip(imagenet_root):
    dm = datamodule(imagenet_root, eval_mode="multi_scale", test_scales=(32, 40))
    _, images, labels = transformed(dm, dm.val_dataloader())[0]
    assert len(images) == 4 and [tuple(v.shape) for v in images[0]] == [(3, 32, 38)] * 2 + [(3, 40, 48)] * 2
    model = ImageClassifier(CifarResNet(8, num_classes=6)).eval()
    with torch.no_grad():
        averaged = model.view_averaged_log_probs(images).exp()
        image = read_rgb(dm.val_set.samples[1][0])
        views = []
        for side in (32, 40):
            resized = (TF.resize(image, [side], antialias=True).float() / 255 - MEAN) / STD
            views += [resized, resized.flip(-1)]
        expected = torch.cat([model(v[None]).softmax(1) for v in views]).mean(0)
    torch.testing.assert_close(averaged[1], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["center", "ten_crop", "multi_scale"])
def test_every_eval_mode_reports_top1_and_top5(imagenet_root, mode, tmp_path):

    dm = ImageNetDataModule(root=str(imagenet_root), eval_mode=mode, test_scales=(32, 40), **SMALL)
    model = ImageClassifier(CifarResNet(8, num_classes=dm.num_classes))
    trainer = quiet_trainer(tmp_path)
    [result] = trainer.test(model, datamodule=dm)
    assert 0 <= result["test/err_top1"] <= 100 and 0 <= result["test/err_top5"] <= result["test/err_top1"]


def corrupt(path: str) -> None:
    Path(path).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")


def test_corrupt_image_is_named_or_skipped_and_counted(imagenet_root, caplog):
    dm = datamodule(imagenet_root)
    bad_path = dm.train_set.samples[5][0]
    corrupt(bad_path)
    with pytest.raises(DataError, match=f"cannot decode image {bad_path}.*--data.skip_corrupt true"):
        dm.train_set[5]

    skipping = datamodule(imagenet_root, skip_corrupt=True, num_workers=2, batch_size=6)
    with pytest.warns(UserWarning, match="skipped unreadable image"):
        image, label = skipping.train_set[5]
    assert label == skipping.train_set.samples[6][1]  # the next image stands in
    batches = list(DataLoader(skipping.train_set, batch_size=6, num_workers=2))  # the workers add to the count
    assert sum(len(labels) for _, labels in batches) == 24
    assert skipping.skipped_images == 2
    with caplog.at_level(logging.WARNING):
        skipping.teardown("fit")
    assert "skipped 2 unreadable images" in caplog.text


def test_bad_layouts_show_the_expected_one(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"expected <root>/train/<wnid>/<image>"):
        ImageNetDataModule(root=str(tmp_path))
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetNotFoundError, match="holds no class folders"):
        ImageNetDataModule(root=str(tmp_path))


def test_val_classes_must_match_train(imagenet_root):
    os.rename(imagenet_root / "val" / IMAGENETTE_WNIDS[0], imagenet_root / "val" / "n99999999")
    with pytest.raises(DatasetNotFoundError, match="must hold the same class folders"):
        datamodule(imagenet_root)


@pytest.fixture
def flat_val(tmp_path) -> Path:
    """The official layout: every validation JPEG in one folder."""
    folder = tmp_path / "ILSVRC2012_img_val"
    folder.mkdir()
    for i in range(1, 7):
        write_jpeg(torch.full((3, 8, 8), 10 * i, dtype=torch.uint8), str(folder / f"ILSVRC2012_val_{i:08d}.JPEG"))
    return folder


def test_ilsvrc_val_helper_links_kaggle_csv_layout(flat_val, tmp_path, capsys):
    labels = tmp_path / "LOC_val_solution.csv"
    wnids = ["n01440764", "n01443537", "n01440764", "n01484850", "n01443537", "n01440764"]
    rows = [f"ILSVRC2012_val_{i:08d},{w} 1 2 3 4 {w} 5 6 7 8" for i, w in enumerate(wnids, 1)]
    labels.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    out = tmp_path / "val"
    ilsvrc_val_main([str(flat_val), str(labels), "--out", str(out)])
    assert "linked 6 images into 3 class folders" in capsys.readouterr().out
    tench = sorted(p.name for p in (out / "n01440764").iterdir())
    assert tench == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000003.JPEG", "ILSVRC2012_val_00000006.JPEG"]
    link = out / "n01440764" / "ILSVRC2012_val_00000003.JPEG"
    assert link.is_symlink() and link.resolve() == (flat_val / link.name).resolve()
    assert read_rgb(str(link))[0, 0, 0] in range(25, 36)  # the JPEG written with value 30
    assert build_class_folders(flat_val, labels, out) == 6  # a second run changes nothing


def test_ilsvrc_val_helper_takes_class_indices_and_reports_problems(flat_val, tmp_path):
    labels = tmp_path / "val.txt"
    labels.write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {i - 1}\n" for i in range(1, 7)))
    out = tmp_path / "val"
    assert build_class_folders(flat_val, labels, out, hardlink=True) == 6
    assert (out / "n01443537" / "ILSVRC2012_val_00000002.JPEG").stat().st_nlink == 2
    labels.write_text("ILSVRC2012_val_00000001.JPEG 0\n")
    with pytest.raises(DataError, match="5 images of .* have no label"):
        build_class_folders(flat_val, labels, tmp_path / "other")
    labels.write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG 1000\n" for i in range(1, 7)))
    with pytest.raises(DataError, match=r"class index 1000 is not in \[0, 1000\)"):
        build_class_folders(flat_val, labels, tmp_path / "other")


def test_real_imagenette_subset(shared_data):
    root = shared_data / "imagenette-mini"
    if not root.is_dir():
        pytest.skip("imagenette-mini not found beside the real CIFAR-10")
    dm = ImageNetDataModule(
        root=str(root),
        batch_size=8,
        crop_size=112,
        train_augmentation=PaperAugmentation((128, 240)),
        val_resize=128,
        num_workers=0,
    )
    dm.setup("fit")
    assert dm.num_classes == 10 and len(dm.train_set) == 1000 and len(dm.val_set) == 500
    assert dm.class_names[dm.classes.index("n03888257")] == "parachute, chute"
    images, labels, key = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 112, 112) and images.dtype == torch.uint8 and labels.max() < 10
    assert key == batch_key(run_seed(), 0, 0)  # the first batch of epoch 0


@pytest.mark.slow
def test_imagenette_config_fits_and_tests_in_every_mode(shared_data, tmp_path, monkeypatch):
    from conftest import CONFIGS
    from resnet_lab.cli import main

    root = shared_data / "imagenette-mini"
    if not root.is_dir():
        pytest.skip("imagenette-mini not found beside the real CIFAR-10")
    monkeypatch.chdir(tmp_path)
    small = [
        "--data.root",
        str(root),
        "--data.crop_size",
        "64",
        "--data.train_augmentation.init_args.scale_range",
        "[72, 128]",
        "--data.val_resize",
        "72",
        "--data.test_scales",
        "[64, 96]",
        "--data.batch_size",
        "8",
        "--data.num_workers",
        "0",
        "--trainer.enable_progress_bar",
        "false",
    ]
    config = ["--config", str(CONFIGS / "resnet18_imagenette.yaml"), *small]
    main(["fit", *config, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2"])
    last = tmp_path / "logs" / "resnet18_imagenette" / "version_0" / "checkpoints" / "last.ckpt"
    for mode in ("center", "ten_crop", "multi_scale"):
        main(["test", *config, "--ckpt_path", str(last), "--data.eval_mode", mode, "--trainer.limit_test_batches", "2"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from resnet_lab.records import read_run_file

    run = last.parents[1]  # each test logs into the run that trained the weights
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    assert len(events.Scalars("test/err_top1")) == len(events.Scalars("test/err_top5")) == 3
    assert [set(t["metrics"]) >= {"test/err_top1", "test/err_top5"} for t in read_run_file(run)["tests"]] == [True] * 3


def worker_normalised(dm: ImageNetDataModule) -> v2.Compose:
    """The evaluation transform as the workers applied it before the normalisation moved to the device."""
    to_input = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if dm.eval_mode == "multi_scale":
        return v2.Compose([MultiScaleViews(dm.test_scales), lambda views: [to_input(view) for view in views]])
    crop = TenCropViews(dm.eval_crop_size) if dm.eval_mode == "ten_crop" else v2.CenterCrop(dm.eval_crop_size)
    return v2.Compose([v2.Resize(dm.val_resize, antialias=True), crop, to_input])


@pytest.mark.parametrize("mode", ["center", "ten_crop", "multi_scale"])
def test_evaluation_on_the_device_gives_the_inputs_and_logits_of_the_worker_normalisation(shared_data, mode):
    root = shared_data / "imagenette-mini"
    if not root.is_dir():
        pytest.skip("imagenette-mini not found beside the real CIFAR-10")
    # The whole image decoded, as then: val_resize 56 would otherwise decode these 224x224 JPEGs at 1/4.
    dm = ImageNetDataModule(root=str(root), batch_size=3, crop_size=48, val_resize=56, eval_mode=mode,
                            test_scales=(48, 64), num_workers=0, decoder="torchvision")  # fmt: skip
    dm.setup("validate")
    raw, images, labels = transformed(dm, dm.val_dataloader())[0]
    before = worker_normalised(dm)
    expected = [before(read_rgb(path)) for path, _ in dm.val_set.samples[:3]]
    model = ImageClassifier(CifarResNet(8, num_classes=10)).eval()
    with torch.no_grad():
        if mode == "multi_scale":
            assert all(v.dtype == torch.uint8 for views in raw for v in views)  # what the workers hand over
            for views, old in zip(images, expected, strict=True):
                assert all(torch.equal(v, o) for v, o in zip(views, old, strict=True))  # to the bit
            logits = model.view_averaged_log_probs(images)
            assert torch.equal(logits, model.view_averaged_log_probs(expected))
        else:
            assert raw.dtype == torch.uint8 and torch.equal(images, torch.stack(expected))
            assert torch.equal(
                model.view_averaged_log_probs(images), model.view_averaged_log_probs(torch.stack(expected))
            )
    assert torch.equal(labels, torch.tensor([label for _, label in dm.val_set.samples[:3]]))


def test_the_paper_s_colour_noise_runs_on_the_device_with_alexnet_s_distribution(imagenet_root):
    # The recipe's own part first, then the configured augmentations, the normalisation; no mixing.
    stacked = datamodule(imagenet_root, augmentations=[EachImage(v2.RandomErasing(p=0.0))]).batch_transforms
    assert [type(a) for a in stacked.augmentations] == [PCALighting, EachImage] and stacked.mixing is None
    dm = datamodule(imagenet_root)
    transforms = dm.batch_transforms
    raw, labels, key = next(iter(dm.train_dataloader()))
    assert raw.dtype == torch.uint8 and raw.shape == (4, 3, 32, 32) and key == batch_key(run_seed(), 0, 0)
    images, _ = transforms(raw, labels, 7)
    # Each image is shifted by one colour, eigvec @ (alpha * eigval), alpha the image's draw from the batch's key.
    alpha = PCALighting(0.1).draw(4, torch.Generator().manual_seed(7))
    shift = (torch.tensor(PCA_EIGVEC) @ (alpha * torch.tensor(PCA_EIGVAL)).T).T
    expected = ((raw.float() / 255 + shift[:, :, None, None]) - MEAN) / STD
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)  # neither rounded nor clipped
    # alpha ~ N(0, 0.1^2), independent per image and component.
    alphas = PCALighting(0.1).draw(200_000, torch.Generator().manual_seed(0))
    assert alphas.mean(0).abs().max() < 1e-3 and (alphas.std(0) - 0.1).abs().max() < 1e-3
    assert torch.corrcoef(alphas.T).fill_diagonal_(0).abs().max() < 0.01
    # Without colour noise the device only normalises the workers' crops.
    plain = datamodule(imagenet_root, train_augmentation=PaperAugmentation((36, 48), lighting_std=0.0))
    images, _ = plain.batch_transforms(raw, labels, 7)
    normalised = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(TF.to_dtype(raw, torch.float32, scale=True))
    assert plain.data_augmentations() == [] and torch.equal(images, normalised)  # torchvision's, to the bit


def test_the_torchvision_recipe_erases_in_the_workers_to_the_mean_pixel(imagenet_root):
    dm = datamodule(imagenet_root, train_augmentation=TorchvisionRecipeAugmentation(trivial_augment=False))
    assert dm.data_augmentations() == []  # nothing per image left for the device
    transform = dm.train_transform()
    assert isinstance(transform.transforms[-1], v2.RandomErasing)
    gray = torch.full((3, 40, 48), 200, dtype=torch.uint8)  # one flat image, 800 times
    torch.manual_seed(0)
    crops = torch.stack([transform(gray) for _ in range(800)])
    assert crops.dtype == torch.uint8 and crops.shape == (800, 3, 32, 32)
    erased = (crops != 200).any(dim=1)  # [800, 32, 32]: the erased pixels
    count = int(erased.flatten(1).any(1).sum())
    assert 55 <= count <= 105  # p = 0.1 per image: 80 expected (binomial std 8.5)
    areas = erased.flatten(1).float().mean(1)[erased.flatten(1).any(1)]
    assert areas.min() >= 0.015 and areas.max() <= 0.34  # torchvision's 2-33% of the image
    # Erased to the mean pixel rounded to a level: after the normalisation, 0 within half a level.
    pixels = crops.permute(0, 2, 3, 1)[erased]
    assert torch.equal(pixels.unique(dim=0), torch.tensor([IMAGENET_MEAN_PIXEL], dtype=torch.uint8))
    images, _ = dm.batch_transforms(crops, torch.zeros(800, dtype=torch.long), 11)
    assert images.permute(0, 2, 3, 1)[erased].abs().max() < 0.01


@pytest.mark.slow
def test_the_same_seed_trains_the_same_imagenet_weights_and_an_old_run_folder_still_tests(imagenet_root, tmp_path,
                                                                                          monkeypatch):  # fmt: skip
    from resnet_lab.cli import main
    from resnet_lab.paper.runs import Run

    monkeypatch.chdir(tmp_path)
    presets = ["--config", str(CONFIGS / "presets" / "trivialaugment.yaml"), "--config",
               str(CONFIGS / "presets" / "cutmix.yaml")]  # fmt: skip
    run = ["fit", "--config", str(CONFIGS / "resnet18_imagenette.yaml"), *presets, "--data.root", str(imagenet_root),
           "--data.crop_size", "32", "--data.val_resize", "36", "--data.train_augmentation.init_args.scale_range",
           "[36, 48]", "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.max_steps", "3",
           "--trainer.limit_val_batches", "1", "--trainer.deterministic", "true", *QUIET]  # fmt: skip
    for seed in (0, 0, 1):
        main([*run, "--seed_everything", str(seed)])
    runs = sorted((tmp_path / "logs" / "resnet18_imagenette").glob("version_*"))
    weights = [torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for r in runs]
    assert all(torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3 for r in runs)
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not torch.equal(weights[0]["backbone.fc.weight"], weights[2]["backbone.fc.weight"])  # another seed

    # A run folder saved before ImageNet took `augmentations`: its config has none, and still evaluates.
    import yaml

    config = yaml.safe_load((runs[0] / "config.yaml").read_text())
    del config["data"]["init_args"]["augmentations"]
    (runs[0] / "config.yaml").write_text(yaml.safe_dump(config))
    last = runs[0] / "checkpoints" / "last.ckpt"
    main(["test", "--config", str(runs[0] / "config.yaml"), "--ckpt_path", str(last), "--trainer.limit_test_batches",
          "1", *QUIET])  # fmt: skip
    data = Run(runs[0]).datamodule()  # as the paper's figures build it, with no trainer
    data.setup("test")
    images, labels = data.on_after_batch_transfer(next(iter(data.test_dataloader())), 0)
    assert images.dtype == torch.float32 and images.shape == (4, 3, 32, 32) and labels.shape == (4,)
    assert data.augmentations == [] and data.mixing is not None


class KeyRecording(ImageNetDataModule):
    """Keeps the key of each training batch it transforms."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.trainer.training:
            self.keys.append(batch[2])
        return super().on_after_batch_transfer(batch, dataloader_idx)


def test_training_batches_are_keyed_by_iteration_and_each_accumulated_micro_batch_by_its_own(imagenet_root, tmp_path):
    import lightning as L

    L.seed_everything(3)
    dm = KeyRecording(root=str(imagenet_root), **SMALL)
    dm.keys = []
    model = ImageClassifier(CifarResNet(8, num_classes=6), optimizer=torch.optim.SGD)
    trainer = quiet_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    # 24 images in batches of 4: 6 batches, 3 iterations of 2 micro-batches, in epoch 0.
    assert dm.keys == [batch_key(3, 0, i) for i in range(6)]


def test_the_decoder_switch_reaches_every_split_and_a_reduced_decode_keeps_the_view(tmp_path):
    from torchvision.io import write_jpeg

    # Smooth 480x640 photographs-to-be (a reduced decode of noise would average it away): evaluated at val_resize 36,
    # which the default decoder reads at 1/8.
    y, x = torch.meshgrid(torch.arange(480), torch.arange(640), indexing="ij")
    for split in ("train", "val"):
        for c, wnid in enumerate(IMAGENETTE_WNIDS[:2]):
            folder = tmp_path / split / wnid
            folder.mkdir(parents=True)
            image = torch.stack([x * 255 // 640, y * 255 // 480, (x + y + 100 * c) % 256]).to(torch.uint8)
            write_jpeg(image, str(folder / "0.JPEG"), quality=90)
    views = {}
    for decoder in ("torchvision", "pil", "simplejpeg"):
        dm = ImageNetDataModule(root=str(tmp_path), **{**SMALL, "decoder": decoder})
        dm.setup("fit")
        assert dm.train_set.decoder == dm.val_set.decoder == decoder
        views[decoder] = dm.val_set[0][0]
    assert ImageNetDataModule(root=str(tmp_path), **SMALL).decoder == "simplejpeg"  # the default
    for decoder in ("pil", "simplejpeg"):
        assert views[decoder].shape == views["torchvision"].shape == (3, 32, 32)
        difference = (views[decoder].float() - views["torchvision"].float()).abs()
        assert 0 < difference.mean() < 3  # decoded at 1/8, not whole: resampling error only


def test_an_unknown_decoder_is_refused_in_one_line(imagenet_root):
    from resnet_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="--data.decoder 'turbo': choose one of torchvision, pil, simplejpeg"):
        ImageNetDataModule(root=str(imagenet_root), decoder="turbo")
