"""One base exception and its specific subclasses.

Every message says what failed, what was expected, what was got, and the fix, so the CLI can print it on one
line and exit 2.

Example:
    >>> from attnscope.errors import HeadSpecError
    >>> str(HeadSpecError("bad head spec", expected="L<layer>H<head>", got="X3", fix="write e.g. L3H5"))
    'bad head spec: expected L<layer>H<head>, got X3. Fix: write e.g. L3H5'
"""


class AttnscopeError(Exception):
    """Base class of every error attnscope raises on purpose."""

    def __init__(self, what: str, *, expected: object = None, got: object = None, fix: str | None = None):
        self.what, self.expected, self.got, self.fix = what, expected, got, fix
        parts = [what]
        if expected is not None or got is not None:
            parts.append(f": expected {expected}, got {got}")
        if fix:
            parts.append(f". Fix: {fix}")
        super().__init__("".join(parts))


class ModelNotFoundError(AttnscopeError):
    """A model name or path could not be resolved (missing directory, unknown name, hub unreachable)."""


class UnsupportedModelError(AttnscopeError):
    """No adapter knows this model family."""


class UnsupportedAttentionError(AttnscopeError):
    """The model's attention implementation cannot be captured (e.g. flash attention without a fallback)."""


class HeadSpecError(AttnscopeError):
    """A head specification such as ``L3H5,L7H*`` is malformed or out of range."""


class SiteError(AttnscopeError):
    """A requested attention site does not exist in the model or trace."""


class InputTooLongError(AttnscopeError):
    """The input is longer than the model's context window."""


class InputError(AttnscopeError):
    """Inputs of the wrong kind or shape were given."""


class CorruptResultError(AttnscopeError):
    """A trace or result file is missing, truncated, or not an attnscope file."""


class CaptureError(AttnscopeError):
    """Capture could not be carried out or its fidelity check failed."""


class AnalysisError(AttnscopeError):
    """An analysis was given inputs it cannot work on."""


class RemoteError(AttnscopeError):
    """A remote (NDIF / nnsight) backend could not be reached or did not complete the job."""
