"""Field extraction without generation: learned rankers over the candidates found in a document."""
