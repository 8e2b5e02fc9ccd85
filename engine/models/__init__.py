"""The learned models as serving uses them, in numpy: the item tower's projection and the reranker."""
