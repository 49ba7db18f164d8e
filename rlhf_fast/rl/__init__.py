"""Pure tensor RL maths: advantages, losses, KL, experience dataclasses. torch only."""
