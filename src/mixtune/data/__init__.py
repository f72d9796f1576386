"""Data: sources, record formats, tokenisation, the mixture sampler and the collator."""
