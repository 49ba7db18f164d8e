"""SFT, reward-model, PPO, GRPO and DPO trainers. They take built objects, not strings to load."""
