"""Generative domain experts (continued training on real text) merged with every method."""
