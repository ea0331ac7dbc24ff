"""Data pipeline: dataset formats, loading, per-stage splits and cached tokenization."""
