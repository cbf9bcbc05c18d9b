"""fedtune: adapt language models to your task, centrally, per site or federated."""

__version__ = "0.1.0"
