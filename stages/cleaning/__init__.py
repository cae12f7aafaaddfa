"""Cleaning: region embeddings clustered per tag, and the one stage that changes labels."""
