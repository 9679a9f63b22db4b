"""Built-in model adapters; importing this package registers them."""

from . import hf_text  # noqa: F401
