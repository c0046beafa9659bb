"""RLVR stage: GRPO / DAPO / GSPO policy optimisation with verifiable rewards."""
