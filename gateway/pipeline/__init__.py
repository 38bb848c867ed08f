"""The cache/upstream half of the data path: classify → cache → single-flight fetch."""
from .handler import Pipeline

__all__ = ["Pipeline"]
