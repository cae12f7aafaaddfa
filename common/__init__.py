"""The bottom layer: what every package shares (reject codes, opening images, atomic files, Parquet rows).
Imports no other package of the project (tests/test_layers.py)."""
