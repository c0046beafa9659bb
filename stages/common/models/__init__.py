"""Models from any checkpoint spec: loading the policy and processor, the MoE discriminator, model shapes, and
the builder of the seeing tiny base. Loading a real checkpoint imports nothing of the tiny world."""
