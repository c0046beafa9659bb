"""PRISM alignment stage: MoE-discriminator pre-alignment (black-box on-policy distillation)."""
