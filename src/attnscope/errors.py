"""One base exception and its specific subclasses.

Every message says what failed, what was expected, what was got, and the fix, so the CLI can print it on one
line and exit 2.

Example:
    >>> from attnscope.errors import HeadSpecError
    >>> str(HeadSpecError("bad head spec", expected="L<layer>H<head>", got="X3", fix="write e.g. L3H5"))
    'bad head spec: expected L<layer>H<head>, got X3. Fix: write e.g. L3H5'
"""


class AttnscopeError(Exception):
    """Base class of every error attnscope raises on purpose.

    A raise site that names no ``fix`` gets the class's ``default_fix``, so every message ends with one.
    """

    default_fix = "check the input against what was expected"

    def __init__(self, what: str, *, expected: object = None, got: object = None, fix: str | None = None):
        fix = fix or self.default_fix
        self.what, self.expected, self.got, self.fix = what, expected, got, fix
        parts = [what]
        if expected is not None or got is not None:
            parts.append(f": expected {expected}, got {got}")
        if fix:
            parts.append(f". Fix: {fix}")
        super().__init__("".join(parts))

    def __reduce__(self):  # pickling (Ray ships errors between processes) keeps the parts, not only the message
        return _rebuild, (type(self), self.what, self.expected, self.got, self.fix)


def _rebuild(cls: type, what: str, expected: object, got: object, fix: str | None) -> "AttnscopeError":
    return cls(what, expected=expected, got=got, fix=fix)


class ModelNotFoundError(AttnscopeError):
    """A model name or path could not be resolved (missing directory, unknown name, hub unreachable)."""

    default_fix = 'check the name or path (`attnscope models` lists the built-in names and zoo organisms)'


class UnsupportedModelError(AttnscopeError):
    """No adapter knows this model family."""

    default_fix = 'pass a model of a supported family (README), or register an adapter for it'


class UnsupportedAttentionError(AttnscopeError):
    """The model's attention implementation cannot be captured (e.g. flash attention without a fallback)."""

    default_fix = "load the model with attn_implementation='sdpa' or 'eager'"


class HeadSpecError(AttnscopeError):
    """A head specification such as ``L3H5,L7H*`` is malformed or out of range."""

    default_fix = 'write heads as L<layer>H<head>, e.g. L3H5,L7H*, inside the model (`attnscope info --model M`)'


class SiteError(AttnscopeError):
    """A requested attention site does not exist in the model or trace."""

    default_fix = 'pick a site the model or trace has (`attnscope info --model M`, or trace.sites)'


class InputTooLongError(AttnscopeError):
    """The input is longer than the model's context window."""

    default_fix = 'shorten the input or select a window'


class InputError(AttnscopeError):
    """Inputs of the wrong kind or shape were given."""

    default_fix = 'change the value to the expected form (`attnscope COMMAND --help` shows each option)'


class ReferenceMismatchError(InputError):
    """Reference inputs (mean / resample ablation) do not fit the model or the edited input: keys, shapes, number
    of positions."""

    default_fix = "pass reference inputs of the same kind and size as the edited input (e.g. images of the same size)"


class CorruptResultError(AttnscopeError):
    """A trace or result file is missing, truncated, or not an attnscope file."""

    default_fix = 're-create the file by re-running the attnscope command that wrote it'


class CaptureError(AttnscopeError):
    """Capture could not be carried out or its fidelity check failed."""

    default_fix = "capture with implementation='eager', or fewer sites, heads or rows"


class AnalysisError(AttnscopeError):
    """An analysis was given inputs it cannot work on."""

    default_fix = "check the analysis' options and inputs (`attnscope score list`)"


class RemoteError(AttnscopeError):
    """A remote (NDIF / nnsight) backend could not be reached or did not complete the job."""

    default_fix = "check the backend's host and API key, or run locally with --local-sim"


class OutputError(InputError, OSError):
    """An output path cannot be written (a directory, under a file, not writable, empty), or writing it failed.
    Also an ``OSError``, so code that catches failed writes as such keeps working."""

    default_fix = "pass --out a writable file path (its folder is created), not a directory"


class MissingExtraError(AttnscopeError, ImportError):
    """An optional dependency is not installed: the message names the extra that installs it. Also an
    ``ImportError``, so code that falls back when a package is missing keeps working."""

    default_fix = "pip install 'attnscope[all]'"
