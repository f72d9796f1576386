"""mixtune: fine-tune causal LMs on several data sources with dynamic, constrained mixtures."""

__version__ = "0.1.0"
