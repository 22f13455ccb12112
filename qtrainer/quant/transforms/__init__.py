"""Model transforms: ``wrap`` (quanters around Conv2D/Linear) and ``fuse`` (Conv2D + BatchNorm folding)."""
