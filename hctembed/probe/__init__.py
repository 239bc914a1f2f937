"""Probes on frozen encoders: the attentive probe (torch), probe files, and probe scores in DuckDB."""
