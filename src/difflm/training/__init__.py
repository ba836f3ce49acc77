"""Training: the loop, EMA, checkpoints, distributed set-up (import Trainer from .trainer)."""
