"""Weights: teacher and student views, the mapping, the strategy, the plan (one index set per space), the
projection of each entry and what it keeps. Above `arch` and `io`.
"""
