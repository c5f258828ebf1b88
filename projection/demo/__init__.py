"""The built-in demo and the benchmarks' support: the trained digits teacher and its assets, its data, classifier,
training, sampling, gallery and convergence runs. Apart: nothing in arch, io, core, function or engine imports it.
"""
