"""prism: PRISM post-training for vision-language models (SFT -> pre-alignment -> RLVR)."""

__version__ = "0.1.0"
