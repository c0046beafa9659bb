"""The policy-update maths: token log-probabilities, group advantages, the clipped losses and the PPO update
step that align and rl share."""
