"""stata-deploy: token-pruned spiking transformers from training to neuromorphic deployment."""

__version__ = "0.1.0"
