"""Real-model quality benchmark: SmolLM2-135M experts fine-tuned on four offline text tasks,
merged through the real ``mergekit-yaml`` CLI and scored on held-out splits."""
