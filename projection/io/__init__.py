"""Files in and out: checkpoints (safetensors, .pt, the hub), untrusted inputs, reading ahead, atomic export folders.

The bottom layer with `arch`: it imports nothing of the package but `errors`.
"""
