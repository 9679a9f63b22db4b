"""A model folder's (or hub name's) own tokenizer or processor, or None when a local folder ships none.

Example:
    >>> import tempfile
    >>> from attnscope.probes.tokenizer_loading import load_tokenizer
    >>> load_tokenizer(tempfile.mkdtemp()) is None      # a folder without tokenizer files
    True
"""

from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model", "preprocessor_config.json", "processor_config.json")


def load_tokenizer(source: str, **kwargs: Any) -> Any:
    """The folder's own tokenizer or processor; None when a local folder ships none (transformers would otherwise
    build a default tokenizer of the architecture that does not match the model's vocabulary)."""
    import transformers

    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None

    for loader in (transformers.AutoProcessor, transformers.AutoTokenizer):
        try:
            return loader.from_pretrained(source, **kwargs)
        except Exception:  # a model may have a tokenizer but no processor, or neither
            continue
    return None
