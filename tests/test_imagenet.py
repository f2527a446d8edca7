import logging
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.io import write_jpeg
from torchvision.transforms.v2 import functional as TF

from conftest import IMAGENETTE_WNIDS, quiet_trainer
from resnet_lab import CifarResNet, ImageClassifier
from resnet_lab.data import ImageNetDataModule, InceptionAugmentation, PaperAugmentation
from resnet_lab.data.ilsvrc_val import build_class_folders
from resnet_lab.data.ilsvrc_val import main as ilsvrc_val_main
from resnet_lab.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, imagenet_class_names, read_rgb
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
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 6
    # Normalised [0, 1] pixels, shifted by at most a few hundredths of PCA lighting noise.
    assert (image >= (0 - MEAN) / STD - 0.5).all() and (image <= (1 - MEAN) / STD + 0.5).all()
    resize = dm.train_transform().transforms[0].transforms[0]
    source = read_rgb(dm.train_set.samples[0][0])  # 40x48
    sides = {min(resize(source).shape[-2:]) for _ in range(400)}
    assert min(sides) >= 36 and max(sides) <= 60 and len(sides) > 15
    assert min(sides) <= 38 and max(sides) >= 58  # the whole range is used


def test_inception_augmentation(imagenet_root):
    dm = datamodule(imagenet_root, train_augmentation=InceptionAugmentation((0.5, 0.5)))
    image, _ = dm.train_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    crop = dm.train_transform().transforms[0].transforms[0]
    params = [crop.make_params([read_rgb(dm.train_set.samples[0][0])]) for _ in range(50)]
    areas = {round(p["height"] * p["width"] / (40 * 48), 1) for p in params}
    assert areas == {0.5}


def test_ten_crop_scores_are_the_average_of_the_ten_views(imagenet_root):
    dm = datamodule(imagenet_root, eval_mode="ten_crop")
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 10, 3, 32, 32)
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
    images, labels = next(iter(dm.val_dataloader()))
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
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 112, 112) and labels.max() < 10


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
