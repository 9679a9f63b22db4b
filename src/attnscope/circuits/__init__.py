"""attnscope.circuits."""
