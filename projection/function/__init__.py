"""What models compute: calibration sets, noise at Wan's levels, the streamed teacher, activation statistics,
the least-squares fit and fidelity. Above `core`.
"""
