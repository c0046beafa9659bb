"""`prism sft`: supervised fine-tuning on demonstrations (the first PRISM stage)."""
