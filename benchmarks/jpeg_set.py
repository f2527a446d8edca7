"""Writes a benchmark set of JPEGs at ImageNet's sizes: real photographs (imagenette's JPEGs) resized to sizes drawn
from an approximation of the ILSVRC-2012 train set's width/height distribution, re-encoded at quality 90.

    python benchmarks/jpeg_set.py --out /tmp/imagenet-sizes [--source <imagenette-mini>] [--count 1000]
    python benchmarks/jpeg_set.py --out /tmp/large --size 1024x768    # every image one size instead

The sizes (PAPER.md gives none; these follow the widely cited figures: about 400x350 on average, most images
500x375 or 375x500, a tail of larger ones). Each image independently:
  - 50%: the longer side 500, the shorter 375;
  - 42%: smaller: the longer side uniform in [150, 500) pixels, the shorter 3/4 of it (rounded);
  - 8%: larger: the longer side log-uniform in [500, 1600] pixels, the shorter 3/4 of it (rounded);
  - landscape (width the longer side) with probability 3/4, else portrait.
The set's mean and its share of images with the shorter side >= 448 (those a 224 crop can decode at 1/2) are
printed: 428x372 and 6% at the default seed and count (433x375 and 7% in the limit).

The photographs are imagenette's 224x224 JPEGs (of ImageNet photos, some grayscale) upscaled with a bicubic filter:
smoother than full-size photos, they hold fewer non-zero DCT coefficients, so their entropy decoding (which a reduced
decode cannot skip) is cheaper than a real photo's of the same size. Decode times measured on them are lower bounds,
and the share that a reduced decode saves is somewhat higher than on real ImageNet JPEGs.

Writes <out>/train/<wnid>/<source name>_<index>.JPEG (ImageFolder layout, imagenette's class folders); nothing is
written inside the repository unless --out says so.
"""

import argparse
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

QUALITY = 90


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of one image, from the mixture in the module docstring."""
    kind = rng.choice(3, p=[0.50, 0.42, 0.08])
    if kind == 0:
        long = 500
    elif kind == 1:
        long = int(rng.integers(150, 500))
    else:
        long = round(math.exp(rng.uniform(math.log(500), math.log(1600))))
    short = round(long * 3 / 4)
    return (long, short) if rng.random() < 0.75 else (short, long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_source = Path(os.environ.get("RESNET_LAB_DATA", "data")) / "imagenette-mini"
    parser.add_argument("--out", required=True, help="folder to write train/<wnid>/*.JPEG into")
    parser.add_argument("--source", default=str(default_source), help="ImageFolder tree of real JPEGs")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", help="WIDTHxHEIGHT of every image, instead of the distribution")
    args = parser.parse_args()
    try:
        fixed = tuple(int(side) for side in args.size.split("x")) if args.size else None
    except ValueError:
        fixed = ()
    if fixed is not None and len(fixed) != 2:
        parser.error(f"--size {args.size}: give WIDTHxHEIGHT, e.g. 1024x768")
    sources = sorted(Path(args.source).glob("*/*/*.JPEG"))
    if not sources:
        parser.error(f"no */*/*.JPEG under {args.source}")
    rng = np.random.default_rng(args.seed)
    sizes = []
    for i in range(args.count):
        source = sources[i % len(sources)]
        size = fixed or draw_size(rng)
        folder = Path(args.out) / "train" / source.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(source, formats=["JPEG"]) as image:
            image.resize(size, Image.BICUBIC).save(folder / f"{source.stem}_{i}.JPEG", quality=QUALITY)
        sizes.append(size)
    widths, heights = np.array(sizes).T
    shorter = np.minimum(widths, heights)
    print(
        f"{args.count} JPEGs (quality {QUALITY}) under {Path(args.out) / 'train'}: mean {widths.mean():.0f}x"
        f"{heights.mean():.0f} (width x height), {(shorter >= 448).mean():.0%} with the shorter side >= 448"
    )


if __name__ == "__main__":
    main()
