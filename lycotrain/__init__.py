"""lycotrain: parameter-efficient adapters for Stable Diffusion and causal LMs, with a browser GUI."""

__version__ = "0.1.0"
