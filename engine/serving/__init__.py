"""The read path: the ANN index, candidates and scores, and the ranked list of a request."""
