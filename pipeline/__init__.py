"""The engine: config, registry, workflow contract, Ray adapter, Parquet store. Knows nothing of tags."""

__version__ = "0.1.0"
