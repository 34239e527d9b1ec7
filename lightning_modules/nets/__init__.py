"""Plain ``nn.Module`` building blocks (no Lightning, no ``datamodules`` imports)."""


class WeightsUnavailable(FileNotFoundError):
    """``pretrained=True`` and the weights are neither cached nor downloadable (no network, ``HF_HUB_OFFLINE``);
    the message completes "pretrained: ...".  The stage turns it into the command lines' one-line error.
    Defined here, not beside timm's use, so that catching it imports no timm."""
