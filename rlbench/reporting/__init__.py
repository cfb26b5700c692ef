"""The reporting wing: run directories in, a comparison report out.

runs (reading run directories, groups, checks), report (tables, markdown, plots), html (the
self-contained page), curves (accuracy against compute), compare (paired tests, power, fits) and
stats (small-sample intervals, McNemar, the two-way model). Reads run directories through
rlbench.rundir only: it never imports training, so a report needs no torch model.
"""
