"""dipo-unlearn: make a language model forget specific training data, and prove it."""

__version__ = "0.1.0"
