"""Training with torch: the item tower, the reranker, and fit's orchestration."""
