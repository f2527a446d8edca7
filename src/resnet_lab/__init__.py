"""Deep residual networks (He et al., 2015) as a PyTorch Lightning research template."""

from resnet_lab.models import CifarResNet, ImageNetResNet
from resnet_lab.module import ImageClassifier

__all__ = ["CifarResNet", "ImageClassifier", "ImageNetResNet"]
