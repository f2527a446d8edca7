"""Turn the official ILSVRC validation folder (all images in one folder) into the per-class ImageFolder layout.

    python -m resnet_lab.data.ilsvrc_val ILSVRC2012_img_val/ LOC_val_solution.csv --out /data/imagenet/val

Nothing is copied: each class folder holds symbolic links (or, with --hardlink, hard links) to the original JPEGs.
Label files understood:
  - Kaggle's `LOC_val_solution.csv`: `ImageId,PredictionString` with the wnid as the first word of the string;
  - two columns `<file name> <label>` per line (e.g. Caffe's `val.txt`), the label a wnid or a class index in
    the standard ImageNet-1k order (sorted wnids, shipped with this package).
"""

import argparse
import csv
import os
import re
import sys
from pathlib import Path

from resnet_lab.data.imagenet import imagenet_class_names
from resnet_lab.errors import DataError, DatasetNotFoundError, UserError

WNID = re.compile(r"n\d{8}")  # an ImageNet synset id, e.g. n01440764: the only names a class folder may take
IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a file name, never a path


def _checked(label_file: Path, row: int, image: str, wnid: str) -> tuple[str, str]:
    """A row's (image stem, wnid), refused in one line unless both are plain names: each becomes a path under --out."""
    if not IMAGE_ID.fullmatch(image) or ".." in image:
        raise DataError(f"{label_file}:{row}: image id {image!r} is not a plain file name ({IMAGE_ID.pattern})")
    if not WNID.fullmatch(wnid):
        raise DataError(f"{label_file}:{row}: wnid {wnid!r} is not an ImageNet synset id (n followed by 8 digits)")
    return Path(image).stem, wnid


def read_labels(label_file: Path) -> dict[str, str]:
    """Map each image's file stem to its wnid."""
    if not label_file.is_file():
        raise DatasetNotFoundError(f"label file {label_file} does not exist")
    wnids = list(imagenet_class_names())
    labels: dict[str, str] = {}
    with label_file.open(newline="") as f:
        if f.readline().strip().lower().startswith("imageid,"):
            for number, row in enumerate(csv.reader(f), 2):
                if row:
                    if len(row) < 2 or not row[1].split():
                        raise DataError(f"{label_file}:{number}: expected 'ImageId,PredictionString', got {row!r}")
                    stem, wnid = _checked(label_file, number, row[0], row[1].split()[0])
                    labels[stem] = wnid
            return labels
        f.seek(0)
        for number, line in enumerate(f, 1):
            words = line.split()
            if not words:
                continue
            if len(words) != 2:
                raise DataError(f"{label_file}:{number}: expected '<file name> <wnid or class index>', got {line!r}")
            name, label = words
            if label.isdigit():
                if not 0 <= int(label) < len(wnids):
                    raise DataError(f"{label_file}:{number}: class index {label} is not in [0, {len(wnids)})")
                label = wnids[int(label)]
            stem, label = _checked(label_file, number, name, label)
            labels[stem] = label
    return labels


def build_class_folders(images_dir: Path, label_file: Path, out_dir: Path, hardlink: bool = False) -> int:
    """Link every labelled image of `images_dir` into `out_dir/<wnid>/`; returns the number of images linked."""
    if not images_dir.is_dir():
        raise DatasetNotFoundError(f"image folder {images_dir} does not exist")
    labels = read_labels(label_file)
    images = {p.stem: p for p in images_dir.iterdir() if p.is_file()}
    missing = sorted(set(labels) - set(images))
    if missing:
        raise DataError(f"{len(missing)} labelled images are not in {images_dir}, e.g. {', '.join(missing[:3])}")
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled:
        raise DataError(f"{len(unlabelled)} images of {images_dir} have no label, e.g. {', '.join(unlabelled[:3])}")
    for stem, wnid in labels.items():
        source = images[stem].resolve()
        target = out_dir / wnid / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            if target.resolve() == source or (hardlink and target.samefile(source)):
                continue  # already done by an earlier run
            raise DataError(f"{target} exists and is not a link to {source}; remove it or choose another --out")
        if hardlink:
            os.link(source, target)
        else:
            target.symlink_to(source)
    return len(labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=Path, help="folder holding the validation JPEGs")
    parser.add_argument("labels", type=Path, help="LOC_val_solution.csv or a '<file> <label>' text file")
    parser.add_argument("--out", type=Path, required=True, help="the new per-class folder, e.g. <root>/val")
    parser.add_argument("--hardlink", action="store_true", help="hard links instead of symbolic links")
    args = parser.parse_args(argv)
    try:
        count = build_class_folders(args.images, args.labels, args.out, args.hardlink)
    except UserError as err:
        sys.exit(f"error: {err}")
    classes = sum(1 for p in args.out.iterdir() if p.is_dir())
    print(f"linked {count} images into {classes} class folders under {args.out}")


if __name__ == "__main__":
    main()
