"""The suites wing: many runs as one benchmark.

suite (the suite file, its matrix, running and resuming it), jobs (the executor-independent job
loop: submit, re-attach, poll, retry, cancel) and probe (a task's learnability, once per suite).
Starts runs as processes of the training wing's command; imports training for the probe only.
"""
