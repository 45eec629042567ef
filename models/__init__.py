"""The segmentation network, its training and shipped weights."""
