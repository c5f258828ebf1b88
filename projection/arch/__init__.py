"""What a model is, as data and as modules: Wan's tensors and spaces, student configs, the runnable students.

The bottom layer with `io`: it imports nothing of the package but `errors`.
"""
