"""LoRA domain experts (adapters and bf16 checkpoints with the adapter folded in) merged with
every method."""
