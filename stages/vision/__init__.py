"""The engine's eyes: the base tagger, the decode pool, boxes and crops, and the one step that looks at
pixels (``evidence.v1``)."""
