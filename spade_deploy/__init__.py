"""spade-deploy: SPADE structured pruning and deployment of model-based deep learning reconstructors."""

__version__ = "0.1.0"
