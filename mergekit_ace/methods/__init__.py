"""Thin mergekit adapters, one module per method, each wrapping a kernel of ``mergekit_ace.kernels``."""
