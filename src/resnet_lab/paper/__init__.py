"""Reproduce the paper's figures and tables from finished runs; see `python -m resnet_lab.paper --help`."""
