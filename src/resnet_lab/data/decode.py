"""Decoding the images of an ImageFolder-layout set, and a JPEG decoded at 1/2, 1/4 or 1/8 of its size where the
first step of the transform would shrink it that much anyway.

libjpeg-turbo decodes a JPEG at 1/f of its size in the DCT domain: each 8x8 block goes through a smaller inverse
DCT, which shrinks the inverse transform, the chroma upsampling and the colour conversion (not the entropy decoding,
which reads every coefficient). torchvision.io has no scaled decode (`decode_jpeg` always returns the whole image),
so the reduced decodes go through PIL (`Image.draft`) or simplejpeg (`min_height`, `min_width`); both bundle
libjpeg-turbo, as torchvision does.

`read_transformed(path, transform)` returns what `transform(read_rgb(path))` returns, up to resampling error: the
first step's random draws are made on the whole image's size (read from the JPEG header), the very calls in the same
order as `transform` makes them, and the step is applied to the reduced image with its parameters scaled by 1/f.
"""

import io
import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from resnet_lab.errors import ConfigError

try:
    import simplejpeg
except ImportError:  # a project install brings it; without it the other two decoders still serve
    simplejpeg = None

Decoder = Literal["torchvision", "pil", "simplejpeg"]
# The fastest of the three per core that keeps the crops (docs/benchmarks.md, "JPEG decoding per core").
DEFAULT_DECODER: Decoder = "simplejpeg"
FACTORS = (8, 4, 2)  # libjpeg-turbo's scaled decodes that shrink both sides by a power of two


def simplejpeg_missing() -> bool:
    return simplejpeg is None


def is_jpeg(data: bytes) -> bool:
    """The JPEG start-of-image marker (ImageNet's train set holds a PNG and CMYK JPEGs under .JPEG names)."""
    return data[:3] == b"\xff\xd8\xff"


def read_torchvision(path: str) -> Tensor:
    """The whole image through torchvision.io: uint8 RGB [3, H, W], grayscale, CMYK, PNG and the rest included."""
    with warnings.catch_warnings():
        # torchvision 0.29 points to TorchCodec for decoding; its own decoder is still the one that ships.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(path, mode=ImageReadMode.RGB)


class Jpeg:
    """A JPEG's bytes and its size from the header alone; `decode(factor)` decodes it once, at 1/`factor`.

    Both decoders give libjpeg-turbo's scaled size, ceil(H / factor) x ceil(W / factor): output pixel (y, x) is
    (within a level or so) the mean of the whole image's pixels [y * factor, (y + 1) * factor) x [x * factor,
    (x + 1) * factor). A file that libjpeg warns about, which simplejpeg refuses, is decoded by PIL.
    """

    def __init__(self, data: bytes, decoder: Decoder) -> None:
        if decoder not in ("pil", "simplejpeg"):
            raise ValueError(f"decoder {decoder!r} has no scaled decode; choose 'pil' or 'simplejpeg'")
        if decoder == "simplejpeg" and simplejpeg is None:
            raise ConfigError(
                "--data.decoder simplejpeg needs the simplejpeg package: pip install simplejpeg, or set "
                "--data.decoder pil (or torchvision)"
            )
        self.data = data
        self.decoder = decoder
        if decoder == "simplejpeg":
            try:
                self.height, self.width = simplejpeg.decode_jpeg_header(data)[:2]
            except ValueError:
                self.decoder = "pil"  # see `decode`
        if self.decoder == "pil":
            try:  # reads the header; the pixels wait for the first access. JPEG only: no other plugin of PIL's runs
                self.image = Image.open(io.BytesIO(data), formats=("JPEG",))
            except Image.DecompressionBombError as err:  # not an OSError: named as any unreadable image is
                raise ValueError(str(err)) from err
            self.width, self.height = self.image.size

    def decode(self, factor: int = 1) -> Tensor:
        """uint8 RGB [3, ceil(H / factor), ceil(W / factor)], in channels-last memory (what torchvision's uint8
        resize reads fastest); grayscale and CMYK converted to RGB."""
        if self.decoder == "pil":
            image = self.image
            if factor > 1:
                image.draft("RGB", (self.width // factor, self.height // factor))
            pixels = np.array(image if image.mode == "RGB" else image.convert("RGB"))
        else:
            try:
                pixels = simplejpeg.decode_jpeg(
                    self.data,
                    colorspace="RGB",
                    min_height=-(-self.height // factor),
                    min_width=-(-self.width // factor),
                )
            except ValueError:
                # simplejpeg refuses any file libjpeg warns about; PIL decodes those as torchvision does (extraneous
                # bytes before a marker: a few ImageNet files), and refuses a truncated or broken one as it does.
                return Jpeg(self.data, "pil").decode(factor)
        return torch.from_numpy(pixels).permute(2, 0, 1)


def read_rgb(path: str, decoder: Decoder = DEFAULT_DECODER) -> Tensor:
    """The whole image as uint8 RGB [3, H, W]; anything but a JPEG (a PNG) goes through torchvision.io."""
    if decoder == "torchvision":
        return read_torchvision(path)
    with open(path, "rb") as f:
        data = f.read()
    return Jpeg(data, decoder).decode() if is_jpeg(data) else read_torchvision(path)


def read_transformed(path: str, transform: nn.Module, decoder: Decoder = DEFAULT_DECODER) -> Tensor:
    """`transform(read_rgb(path, decoder))`, with the JPEG decoded at 1/f where `transform`'s first step would shrink
    it by at least f in {2, 4, 8} (`reduced_first_step`); up to resampling error, the same pixels for the same torch
    seed, and the same draws from torch's generator. Anything else (another first step, a PNG, the "torchvision"
    decoder) is decoded whole and transformed."""
    if decoder == "torchvision":
        return transform(read_torchvision(path))
    with open(path, "rb") as f:
        data = f.read()
    if not is_jpeg(data):
        return transform(read_torchvision(path))
    jpeg = Jpeg(data, decoder)
    reduced = reduced_first_step(transform, jpeg.height, jpeg.width)
    if reduced is None:
        return transform(jpeg.decode())
    factor, finish = reduced
    return finish(jpeg.decode(factor))


def reduced_first_step(transform: nn.Module, height: int, width: int) -> tuple[int, Callable[[Tensor], Tensor]] | None:
    """For a transform whose first step is recognised: the decode's factor f (1, 2, 4 or 8) for an image of `height`
    x `width`, and the function that takes the image decoded at 1/f to what `transform` makes of the whole image.

    The first step's random draws are made here, on a stand-in of the whole image's size, as `transform` would make
    them; the later steps make theirs when the function runs, as they would. Recognised first steps:
    `v2.RandomResizedCrop` (f: the drawn box still at least the output size at 1/f; the box scaled by 1/f, rounded
    to the reduced image's pixels), `v2.RandomShortestSize` (the paper's scale augmentation, before its
    `RandomCrop`: f with the image at 1/f still at least the drawn size, resized to that very size) and `v2.Resize`
    (evaluation: the output size computed from the whole image, as torchvision computes it). None, and no draws,
    for any other first step, or a `v2.Resize` that would not shrink the image by 2 (it has no draws to keep).
    """
    steps = list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
    if not steps:
        return None
    first, rest = steps[0], steps[1:]
    # make_params reads only the size: an expanded 0-d tensor holds no pixels.
    stand_in = [torch.empty((), dtype=torch.uint8).expand(3, height, width)]
    if isinstance(first, v2.RandomResizedCrop):
        box = first.make_params(stand_in)
        factor = largest_factor(box["height"], box["width"], first.size)
        top, left = round(box["top"] / factor), round(box["left"] / factor)
        scaled = dict(
            top=top,
            left=left,
            height=round((box["top"] + box["height"]) / factor) - top,
            width=round((box["left"] + box["width"]) / factor) - left,
        )

        def apply(image: Tensor) -> Tensor:
            return first.transform(image, scaled)

    elif isinstance(first, v2.RandomShortestSize):
        params = first.make_params(stand_in)  # the output size itself: no rounding on the reduced image
        factor = largest_factor(height, width, params["size"])

        def apply(image: Tensor) -> Tensor:
            return first.transform(image, params)

    elif isinstance(first, v2.Resize) and first.size is not None:
        size = resized_size(height, width, first.size, first.max_size)
        factor = largest_factor(height, width, size)
        if factor == 1:
            return None

        def apply(image: Tensor) -> Tensor:
            return TF.resize(image, list(size), interpolation=first.interpolation, antialias=first.antialias)

    else:
        return None

    def finish(image: Tensor) -> Tensor:
        image = apply(image)
        for step in rest:
            image = step(image)
        return image

    return factor, finish


def largest_factor(height: int, width: int, size: tuple[int, int] | list[int]) -> int:
    """The largest f in {1, 2, 4, 8} with height / f and width / f still at least `size` (height, width): the step
    still shrinks (or keeps) the reduced image, never enlarges it."""
    return next((f for f in FACTORS if height >= f * size[0] and width >= f * size[1]), 1)


def resized_size(height: int, width: int, size: list[int], max_size: int | None) -> tuple[int, int]:
    """The (height, width) that `v2.Resize(size, max_size=max_size)` gives a `height` x `width` image, by
    torchvision's rule. Computed from the whole image: on the reduced one the longer side can round to another
    pixel."""
    if len(size) == 2:
        return size[0], size[1]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size[0], int(size[0] * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)
