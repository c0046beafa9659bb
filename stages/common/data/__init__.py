"""Training data in: the accepted dataset formats and the chat rendering of a sample for training."""
