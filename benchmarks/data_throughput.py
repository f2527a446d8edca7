"""Decode + augment throughput of the ImageNet training pipelines per decoder, in images per second per worker.

    python benchmarks/jpeg_set.py --out /tmp/imagenet-sizes       # JPEGs at ImageNet's sizes (its docstring says how)
    taskset -c 1 python benchmarks/data_throughput.py --root /tmp/imagenet-sizes --root /path/to/imagenette

One worker is one process with one torch thread, decoding and augmenting one image at a time
(`resnet_lab.data.decode.read_transformed`: the JPEG at 1/2, 1/4 or 1/8 of its size where the crop allows, except
with the "torchvision" decoder, today's full decode), which is what each DataLoader worker does: a loader with N
workers supplies at most about N times this, and one GPU that trains on 3,000 images/s needs 3000 / (images/s per
worker) cores.

Each row is measured once in each of --rounds rounds, the rows alternating within a round. The table gives the
median round, and the median of each round's ratio to the torchvision row measured just before it (load from other
processes that comes and goes then weighs on both sides of a ratio alike). Time is the process's CPU time
(`time.process_time`: the worker's own core-seconds, its file reads included), so that another process sharing the
core does not count against it. Prints a Markdown table and writes JSON.
"""

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path
from typing import get_args

import PIL
import simplejpeg
import torch
from PIL import Image
from torch import nn
from torchvision.datasets import ImageFolder

from resnet_lab.data import InceptionAugmentation, PaperAugmentation
from resnet_lab.data.decode import Decoder, read_transformed, reduced_first_step

GPU_RATE = 3000  # images/s one GPU trains on: what the cores column sizes the loader for
WARMUP = 20  # images decoded before each timing: file cache, allocator


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def images_per_s(paths: list[str], transform: nn.Module, decoder: Decoder) -> float:
    torch.manual_seed(0)  # the same crops for every decoder: the same work
    for path in paths[:WARMUP]:
        read_transformed(path, transform, decoder)
    torch.manual_seed(0)
    start = time.process_time()
    for path in paths:
        read_transformed(path, transform, decoder)
    return len(paths) / (time.process_time() - start)


def reduced_share(paths: list[str], transform: nn.Module) -> float:
    """The share of the images a reduced-capable decoder decodes at 1/2 or less (from the first step's draws)."""
    torch.manual_seed(0)
    reduced = 0
    for path in paths:
        with Image.open(path, formats=["JPEG", "PNG"]) as image:
            width, height = image.size
            jpeg = image.format == "JPEG"
        step = reduced_first_step(transform, height, width) if jpeg else None
        reduced += step is not None and step[0] > 1
    return reduced / len(paths)


def mean_size(paths: list[str]) -> str:
    sizes = [Image.open(path, formats=["JPEG", "PNG"]).size for path in paths]
    return f"{sum(w for w, _ in sizes) / len(sizes):.0f}x{sum(h for _, h in sizes) / len(sizes):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", action="append", required=True, help="ImageFolder root holding train/; repeatable")
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=1000, help="images decoded per row and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decoders", nargs="+", default=list(get_args(Decoder)), choices=get_args(Decoder))
    parser.add_argument(
        "--json", help="also write the rows there (the committed runs: benchmarks/data_throughput_run*.json)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker process runs single-threaded
    scale = (round(args.crop_size * 256 / 224), round(args.crop_size * 480 / 224))
    pipelines = {
        "paper": PaperAugmentation(scale).build(args.crop_size),
        "inception": InceptionAugmentation().build(args.crop_size),
    }
    sets = {}
    for root in args.root:
        samples = [path for path, _ in ImageFolder(str(Path(root) / "train")).samples]
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
        sets[root] = [samples[order[i % len(order)]] for i in range(args.images)]
    rows = [
        dict(root=root, size=mean_size(paths), pipeline=pipeline, decoder=decoder, rounds=[])
        for root, paths in sets.items()
        for pipeline in pipelines
        for decoder in args.decoders
    ]
    for _ in range(args.rounds):
        for row in rows:
            rate = images_per_s(sets[row["root"]], pipelines[row["pipeline"]], row["decoder"])
            row["rounds"].append(round(rate, 1))
    for row in rows:
        row["images_per_s_per_worker"] = statistics.median(row["rounds"])
        row["cores_for_3000_per_s"] = round(GPU_RATE / row["images_per_s_per_worker"], 2)
        row["reduced_share"] = round(reduced_share(sets[row["root"]], pipelines[row["pipeline"]]), 3)
        same = [
            r for r in rows if (r["root"], r["pipeline"], r["decoder"]) == (row["root"], row["pipeline"], "torchvision")
        ]
        ratios = [ours / today for ours, today in zip(row["rounds"], same[0]["rounds"], strict=True)] if same else []
        row["vs_torchvision"] = round(statistics.median(ratios), 2) if ratios else None
    meta = {
        "date": date.today().isoformat(),
        "machine": cpu_model(),
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "simplejpeg": simplejpeg.__version__,
        "crop": args.crop_size,
        "images": args.images,
        "rounds": args.rounds,
        "clock": "process CPU time",
    }
    print(
        f"Decode + augment, one worker process (one torch thread), crop {args.crop_size}, paper scale range {scale}; "
        f"median of {args.rounds} rounds of {args.images} images ({meta['date']}, {meta['machine']}, cores "
        f"{meta['affinity']}, torch {meta['torch']}, Pillow {meta['pillow']}, simplejpeg {meta['simplejpeg']})\n"
    )
    print(
        "| set (mean size) | pipeline | decoder | images/s per worker | rounds | vs torchvision | "
        f"cores for {GPU_RATE:,} images/s | decoded reduced |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = f"{r['reduced_share']:.0%}" if r["decoder"] != "torchvision" else "-"
        ratio = f"{r['vs_torchvision']:.2f}x" if r["vs_torchvision"] is not None else ""
        print(
            f"| {Path(r['root']).name} ({r['size']}) | {r['pipeline']} | {r['decoder']} | "
            f"{r['images_per_s_per_worker']:.0f} | {' / '.join(f'{v:.0f}' for v in r['rounds'])} | {ratio} | "
            f"{r['cores_for_3000_per_s']:.1f} | {share} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
