"""Kept so `stages.align.discriminator` imports keep working: the discriminator model lives in
stages.common.discriminator (export loads it too)."""

from stages.common.discriminator import (CONFIG_KEY, VALUE_HEAD_GAIN, DiscriminatorOutput,  # noqa: F401
                                         Qwen3VLDiscriminator, Qwen3VLMoeDiscriminator, aux_loss_coef,
                                         disc_settings, discriminator_dir, is_text_only, load_discriminator,
                                         load_discriminator_processor, moe_config_from_dense, save_discriminator,
                                         upcycle)
