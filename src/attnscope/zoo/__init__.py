"""attnscope.zoo."""
