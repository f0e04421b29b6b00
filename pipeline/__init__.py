"""Pruning-and-finetune pipeline for image classifiers: pretrain -> prune -> recover.

Library entry point for users' scripts:

    import pipeline
    model = pipeline.load_model("checkpoints/<run>/<stage>/model.pt")  # dense or pruned
"""

from .models import load_model

__version__ = "0.1.0"
__all__ = ["load_model", "__version__"]
