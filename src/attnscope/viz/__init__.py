"""attnscope.viz."""
