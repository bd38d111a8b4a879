"""promptdg: a command-line experiment runner for CLIP-based domain generalization and adaptation."""
__version__ = "0.1.0"
