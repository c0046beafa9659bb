"""The embedded tiny world: the tiny Qwen3-VL factories, their vocabulary, and the synth benchmark with its oracle
teacher. Builds what a machine without a model hub runs on; imports only the contract."""
