"""Fixtures made offline: tiny random pipelines and models built from configs, and synthetic video-like q/k."""
