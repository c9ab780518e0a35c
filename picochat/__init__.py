"""picochat: train a GPT-2-grade chat model from scratch on one node, and talk to it."""

__version__ = "0.1.0"
