"""`python -m projection.demo train`: retrain the demo teacher (`folder.main`)."""
from .folder import main

main()
