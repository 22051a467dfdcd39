"""The version of this package (``mergekit_ace.__version__``)."""

__version__ = "0.1.0"
