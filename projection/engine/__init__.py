"""The Projector and what it drives: projected and loaded students, the function report, the export. Above
`function`; only the programs (CLI, app) and the demo stand above it.
"""
