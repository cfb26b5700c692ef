"""The training wing: one run from a config to its run directory.

trainer (the step loop) over setup (models, reference, optimizer), sampler / async_rollouts
(rollouts and rewards), update / accumulate (the loss side and the optimizer side of a step),
evaluation, checkpoints, faults, cost and step_metrics; zero and dist for DeepSpeed and
multi-process runs; export writes a checkpoint as a Hugging Face model. Imports the public API
(rlbench.config, types, ops, manager, rundir) and the modeling wing; never suites or reporting.
"""
