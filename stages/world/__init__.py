"""The generated scene world: the embedded default corpus, with ground truth and a scorer."""
