"""The traditional methods Kindling is measured against, each a real library implementation."""

from __future__ import annotations

from .base import Method, Query, ScoringMethod, TrainSet
from .collaborative import ALSMethod, ItemKNNMethod
from .content import LMProfileMethod, TfidfProfileMethod
from .hybrid import LightFMMethod
from .simple import PopularityMethod, RandomMethod

__all__ = ["ALSMethod", "ItemKNNMethod", "LMProfileMethod", "LightFMMethod", "Method", "PopularityMethod",
           "Query", "RandomMethod", "ScoringMethod", "TfidfProfileMethod", "TrainSet"]
