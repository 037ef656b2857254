"""Experiments over finished runs: plots, summaries, comparisons across strategies."""
