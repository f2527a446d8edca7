"""Entry point: `python main.py fit --config configs/resnet110_cifar.yaml` (see README.md)."""

from resnet_lab.cli import main

if __name__ == "__main__":
    main()
