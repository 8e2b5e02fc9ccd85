"""The traditional methods Kindling is measured against, each a real library implementation."""

from __future__ import annotations

from .base import Method, Query, ScoringMethod, TrainSet
from .bm25 import BM25Method
from .collaborative import ALSMethod, ItemKNNMethod
from .content import LMProfileMethod, TfidfProfileMethod
from .cooccurrence import CooccurrenceMethod
from .ease import EASEMethod
from .hybrid import LightFMMethod
from .simple import PopularityMethod, RandomMethod

__all__ = ["ALSMethod", "BM25Method", "CooccurrenceMethod", "EASEMethod", "ItemKNNMethod", "LMProfileMethod",
           "LightFMMethod", "Method", "PopularityMethod", "Query", "RandomMethod", "ScoringMethod",
           "TfidfProfileMethod", "TrainSet"]
