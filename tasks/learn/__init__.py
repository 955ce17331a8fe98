"""Learning from the frontier: harvested labels, cached embeddings and training rounds for heads and rankers."""
