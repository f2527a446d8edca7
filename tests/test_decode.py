"""The reduced JPEG decode (resnet_lab.data.decode): the crops of the full decode, the same draws, the same pixels
where nothing is reduced.

The images are real photographs, imagenette's 224x224 JPEGs, upscaled and re-encoded (quality 90) to the sizes at
which the pipelines decode at 1/2, 1/4 or 1/8.
"""

import math
import os
from pathlib import Path

import pytest
import simplejpeg
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from conftest import REPO
from resnet_lab.data import InceptionAugmentation, PaperAugmentation, TorchvisionRecipeAugmentation
from resnet_lab.data.decode import Jpeg, read_rgb, read_torchvision, read_transformed, reduced_first_step, resized_size

SCALED = ("pil", "simplejpeg")
PIPELINES = {
    "paper": lambda: PaperAugmentation().build(224),
    "inception": lambda: InceptionAugmentation().build(224),
    "torchvision_recipe": lambda: TorchvisionRecipeAugmentation().build(176),
    "eval": lambda: v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)]),
}
SEEDS = range(8)
# (mean, max) absolute difference in levels of 255 between a reduced decode's output and the full decode's: the mean
# over the seeds and images of one pipeline, the max for any one output. The reduced path differs from the full one
# in two ways only: libjpeg-turbo's scaled IDCT averages f x f pixels where the antialiased resize would weigh them
# with a wider triangle filter (so a reduced decode is a little sharper, the more so the larger f), and a
# random-resized crop's box is rounded to the reduced image's pixels (at most half a reduced pixel per edge, under
# half an output pixel). Measured on these photos, (mean, max): paper at 1/2 (0.5, 1.0), evaluation at 1/4 (1.9,
# 2.1), inception at 1/2 and 1/4 (1.7, 3.2), torchvision's recipe (1.9, 4.9: TrivialAugment's posterize, solarize
# and equalize turn a level's difference into several). The tolerances leave about 1.5x that; another seed's crop of
# the same image (the mirror image's view, for evaluation) is 24 levels off or more, FAR is half of that.
TOLERANCE = {"paper": (1, 2.5), "eval": (3, 4), "inception": (3, 6), "torchvision_recipe": (3.5, 10)}
FAR = 12


def mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def imagenette() -> Path:
    """The real subset, under `$RESNET_LAB_DATA` or, as .ci/run sets it, ../shared/data beside the repository."""
    root = Path(os.environ.get("RESNET_LAB_DATA") or REPO.parent / "shared" / "data") / "imagenette-mini"
    if not root.is_dir():
        pytest.skip(f"{root} not found: set RESNET_LAB_DATA to the folder holding imagenette-mini")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as in a DataLoader worker (and five times faster than two on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photographs: three in colour and one grayscale at 224 (as they are) and upscaled to 1400x1050 or
    1050x1400, a CMYK JPEG, a PNG, and a PNG under a .JPEG name (as ImageNet's train set holds one)."""
    sources = sorted((imagenette() / "train").glob("*/*.JPEG"))
    colour = [p for p in sources[::97] if Image.open(p).mode == "RGB"][:3]
    gray = next(p for p in sources if Image.open(p).mode == "L")
    out = tmp_path_factory.mktemp("photos")
    files = {}
    for i, source in enumerate([*colour, gray]):
        name = f"gray{i}" if source == gray else f"rgb{i}"
        files[f"{name}_224"] = source
        image = Image.open(source)
        size = (1050, 1400) if i == 1 else (1400, 1050)
        image.resize(size, Image.BICUBIC).save(out / f"{name}.JPEG", quality=90)
        files[name] = out / f"{name}.JPEG"
    large = Image.open(files["rgb0"])
    large.convert("CMYK").save(out / "cmyk.JPEG", quality=90)
    large.save(out / "photo.png")
    large.save(out / "png_named.JPEG", format="PNG")
    files.update(cmyk=out / "cmyk.JPEG", png=out / "photo.png", png_named=out / "png_named.JPEG")
    return files


class DecodedFactors:
    """Records the factor of every reduced-capable decode (`Jpeg.decode`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.factors: list[int] = []
        decode = Jpeg.decode

        def spy(jpeg: Jpeg, factor: int = 1) -> torch.Tensor:
            self.factors.append(factor)
            return decode(jpeg, factor)

        monkeypatch.setattr(Jpeg, "decode", spy)


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_a_reduced_decode_gives_the_full_decode_s_output_and_draws(photos, pipeline, monkeypatch):
    transform = PIPELINES[pipeline]()
    decoded = DecodedFactors(monkeypatch)
    diffs, others = {decoder: [] for decoder in SCALED}, []
    for name in ("rgb0", "rgb1", "rgb2", "gray3", "cmyk"):
        full = read_torchvision(str(photos[name]))
        for seed in SEEDS:
            torch.manual_seed(seed)
            expected = transform(full)
            state = torch.get_rng_state()
            for decoder in SCALED:
                torch.manual_seed(seed)
                got = read_transformed(str(photos[name]), transform, decoder)
                assert got.shape == expected.shape and got.dtype == torch.uint8
                assert torch.equal(torch.get_rng_state(), state)  # the same draws, in the same order
                diffs[decoder].append(mad(got, expected))
            # Something this measure tells apart: another seed's crop, or (no draws) the mirror image's view.
            torch.manual_seed(seed + 1000)
            other = transform(TF.horizontal_flip(full) if pipeline == "eval" else full)
            others.append(mad(other, expected))
    assert min(decoded.factors) >= 2 if pipeline in ("eval", "paper") else max(decoded.factors) >= 4
    mean_tolerance, max_tolerance = TOLERANCE[pipeline]
    for decoder, measured in diffs.items():
        assert sum(measured) / len(measured) <= mean_tolerance and max(measured) <= max_tolerance, (decoder, measured)
    assert min(others) >= FAR, others


@pytest.mark.parametrize("decoder", ["torchvision", *SCALED])
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_with_nothing_to_reduce_the_output_is_exactly_transform_of_read_rgb(photos, pipeline, decoder, monkeypatch):
    """224 images (nothing shrinks by 2), a PNG (also under a .JPEG name), an unrecognised first step: the very
    pixels and draws of decoding whole."""
    cases = [(PIPELINES[pipeline](), name) for name in ("rgb0_224", "gray3_224", "png", "png_named")]
    cases.append((v2.Compose([v2.CenterCrop(900), PIPELINES[pipeline]()]), "rgb0"))
    decoded = DecodedFactors(monkeypatch)
    for transform, name in cases:
        for seed in SEEDS[:3]:
            torch.manual_seed(seed)
            expected = transform(read_rgb(str(photos[name]), decoder))
            state = torch.get_rng_state()
            torch.manual_seed(seed)
            assert torch.equal(read_transformed(str(photos[name]), transform, decoder), expected)
            assert torch.equal(torch.get_rng_state(), state)
    assert set(decoded.factors) <= {1}


@pytest.mark.parametrize("decoder", SCALED)
def test_every_decoder_reads_torchvision_s_pixels(photos, decoder):
    for name in ("rgb0_224", "gray3_224", "rgb1", "gray3", "png", "png_named"):
        assert torch.equal(read_rgb(str(photos[name]), decoder), read_torchvision(str(photos[name]))), name
    cmyk = read_rgb(str(photos["cmyk"]), decoder)
    assert (cmyk.int() - read_torchvision(str(photos["cmyk"])).int()).abs().max() <= 1  # CMYK to RGB, rounded
    with pytest.raises(ValueError, match="no scaled decode"):
        Jpeg(photos["rgb0"].read_bytes(), "torchvision")


@pytest.mark.parametrize("decoder", SCALED)
def test_a_damaged_jpeg_decodes_or_fails_as_through_torchvision(photos, decoder, tmp_path):
    """Extraneous bytes before a marker (a libjpeg warning, in a few ImageNet files; simplejpeg refuses them, PIL
    decodes them) decode to the same pixels; a truncated or broken file raises an error the dataset reports or skips
    (torchvision raises RuntimeError)."""
    data = photos["rgb0"].read_bytes()
    damaged_files = []
    for marker in (b"\xff\xc4", b"\xff\xda"):  # before the Huffman tables, before the scan
        at = data.index(marker)
        damaged_files.append(tmp_path / f"extraneous_{marker.hex()}.JPEG")
        damaged_files[-1].write_bytes(data[:at] + b"\x00\x00\x00" + data[at:])
    transform = PIPELINES["inception"]()
    torch.manual_seed(0)
    expected = transform(read_torchvision(str(photos["rgb0"])))
    for damaged in damaged_files:
        with pytest.raises(ValueError, match="extraneous bytes"):  # the case for PIL
            simplejpeg.decode_jpeg(damaged.read_bytes())
        assert torch.equal(read_rgb(str(damaged), decoder), read_torchvision(str(photos["rgb0"])))
        torch.manual_seed(0)
        assert mad(read_transformed(str(damaged), transform, decoder), expected) <= 6
    truncated, broken = tmp_path / "truncated.JPEG", tmp_path / "broken.JPEG"
    truncated.write_bytes(data[: len(data) // 2])
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    for bad in (truncated, broken):
        with pytest.raises(RuntimeError):
            read_torchvision(str(bad))
        with pytest.raises((ValueError, OSError)):  # what the dataset catches, with RuntimeError
            read_rgb(str(bad), decoder)
        with pytest.raises((ValueError, OSError)):
            read_transformed(str(bad), transform, decoder)


@pytest.mark.parametrize("decoder", SCALED)
def test_a_large_image_is_decoded_at_libjpeg_s_reduced_size(photos, decoder, monkeypatch):
    data = photos["rgb1"].read_bytes()  # 1050 wide, 1400 high
    for factor in (1, 2, 4, 8):
        image = Jpeg(data, decoder).decode(factor)
        assert image.shape == (3, math.ceil(1400 / factor), math.ceil(1050 / factor))
    # Evaluation at half of the pipelines' scale: the shorter side 1050 is more than 8 times 128.
    transform = v2.Compose([v2.Resize(128, antialias=True), v2.CenterCrop(112)])
    assert reduced_first_step(transform, 1400, 1050)[0] == 8
    decoded = DecodedFactors(monkeypatch)
    view = read_transformed(str(photos["rgb1"]), transform, decoder)
    assert decoded.factors == [8]
    # At 1/8 the decode is an 8 x 8 box average, sharper than the resize's triangle filter 16 pixels wide: the
    # largest difference of the reduced decodes, 4.0 levels measured here (0.1 at 1/2, 1.4 at 1/4).
    assert mad(view, transform(read_torchvision(str(photos["rgb1"])))) <= 5


def test_resized_size_is_torchvision_s_rule():
    for height, width in [(375, 500), (500, 375), (1001, 750), (750, 1001), (333, 333), (2000, 301)]:
        for size, max_size in [([256], None), ([232], None), ([256], 400), ([224, 300], None)]:
            canvas = tv_tensors.BoundingBoxes(torch.zeros(1, 4), format="XYXY", canvas_size=(height, width))
            resized = TF.resize(canvas, size, max_size=max_size)  # a box resizes its canvas, no pixels
            assert resized_size(height, width, size, max_size) == tuple(resized.canvas_size)
