"""The modeling wing: model plumbing that knows nothing of training.

models (load, the embedded and tiny models, stop tokens), logprobs (per-token log-probabilities
of π_T, entropy, exact KL), lora (adapters and merged weights for the engines), critic (PPO's
value model). Imports nothing else of rlbench: everything above may use it.
"""
