"""attnscope.datasets."""
