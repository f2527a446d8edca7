"""Decode + augment throughput of the ImageNet training pipelines, in images per second per worker process.

    python benchmarks/data_throughput.py --root /path/to/imagenette [--crop-size 224] [--images 400]

One worker is one process decoding and augmenting one image at a time, which is what each DataLoader worker
does; a loader with N workers supplies at most about N times this. Prints a Markdown table and writes JSON.
"""

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

from resnet_lab.data import ImageAugmentation, ImageNetDataModule, InceptionAugmentation, PaperAugmentation


def measure(dm: ImageNetDataModule, name: str, augmentation: ImageAugmentation, count: int) -> dict:
    dm.train_augmentation = augmentation
    dm.setup("fit")
    dataset = dm.train_set
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    indices = [order[i % len(order)] for i in range(count)]
    for i in indices[:20]:  # warm-up: file cache, allocator
        dataset[i]
    start = time.perf_counter()
    for i in indices:
        dataset[i]
    seconds = time.perf_counter() - start
    return {
        "pipeline": name,
        "images": count,
        "seconds": round(seconds, 3),
        "images_per_s_per_worker": round(count / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="ImageFolder root holding train/ and val/")
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=400, help="images decoded per pipeline")
    parser.add_argument("--json", default="benchmarks/data_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker process runs single-threaded
    scale = (round(args.crop_size * 256 / 224), round(args.crop_size * 480 / 224))
    dm = ImageNetDataModule(root=args.root, crop_size=args.crop_size, num_workers=0)
    pipelines = {"paper": PaperAugmentation(scale), "inception": InceptionAugmentation()}
    rows = [measure(dm, name, augmentation, args.images) for name, augmentation in pipelines.items()]
    meta = {
        "date": date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "root": str(Path(args.root)),
        "crop": args.crop_size,
    }
    print(
        f"Decode + augment, one worker process, crop {args.crop_size}, scale range {scale} ({meta['date']}, "
        f"{meta['cpus']} CPUs, torch {meta['torch']})\n"
    )
    print("| pipeline | images | seconds | images/s per worker |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['pipeline']} | {r['images']} | {r['seconds']} | {r['images_per_s_per_worker']} |")
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
