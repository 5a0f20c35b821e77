"""Comparison data: formats (JSON, Parquet shards), the synthetic set, and the Ray Data pair pipeline.

Import the submodules you need; this package imports nothing heavy (no ray, no pyarrow) by itself.
"""
