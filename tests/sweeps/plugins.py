"""Test-only analyses the sweep tests import into Ray workers through the spec's ``imports:`` (a .py path).

- ``test-kill-once``: the first time (no marker file yet) it writes its pid to the marker and kills its own
  worker process with ``os._exit``; afterwards it is ``head-stats``.
- ``test-slow``: ``head-stats`` after sleeping, appending one line per execution to a log (an execution counter).
- ``test-fail``: raises, always.

Also ``word_tokenizer()``: a tokenizer for the tiny models (nnsight's TransformersModel needs one).
"""

import os
import time

from attnscope.circuits.registry import register_analysis
from attnscope.errors import AnalysisError
from attnscope.circuits.streaming_head_stats import head_stats


@register_analysis("test-kill-once", description="kills its worker the first time, then head-stats")
def kill_once(model, suite, *, marker: str, **options):
    if not os.path.exists(marker):
        with open(marker, "w") as handle:
            handle.write(str(os.getpid()))
            handle.flush()
            os.fsync(handle.fileno())
        os._exit(1)
    return head_stats(model, suite, **options)


@register_analysis("test-slow", description="sleeps, logs the execution, then head-stats")
def slow(model, suite, *, seconds: float = 1.0, log: str | None = None, tag: str = "", **options):
    time.sleep(seconds)
    if log:
        with open(log, "a") as handle:
            handle.write(f"{tag} {os.getpid()} {time.time()}\n")
    return head_stats(model, suite, **options)


@register_analysis("test-fail", description="always raises")
def fail(model, suite, **options):
    raise AnalysisError("planted failure", expected="nothing", got="a test cell")


def word_tokenizer(vocab_size: int = 64):
    """Whitespace word-level tokenizer over ``t0 .. t{vocab_size-1}`` (``t0`` pads)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t1"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t1", pad_token="t0", eos_token="t0")
