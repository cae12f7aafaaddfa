"""The text side of the engine: captions parsed into tags, the tag vocabulary, labels."""
