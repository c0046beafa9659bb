"""prism: PRISM post-training for vision-language models (SFT -> pre-alignment -> RLVR)."""

from stages.common.contract import __version__  # noqa: F401  (prism --version; pyproject.toml holds the same)
