"""Training: the base tagger on the parse labels, the tagger retrained on the cleaned ones."""
