"""The one exception type for user mistakes.

A :class:`ValfreeError` carries a single sentence that says what is wrong, where, and how to fix it.
The CLI prints that sentence and exits non-zero instead of showing a traceback; library callers can
catch it like any other exception. Bugs in valfree itself stay ordinary exceptions so that they are
not mistaken for user errors.
"""


class ValfreeError(ValueError):
    """A problem with the user's input (data, model, checkpoint, option), explained in one sentence."""


class CheckpointError(ValfreeError):
    """One checkpoint cannot be used (unreadable, unsafe, incomplete, too large): its row fails, the others go on.

    Raised only while loading a single checkpoint, so a caller looping over many can record it as that
    checkpoint's failure instead of stopping the run.
    """


class UnsafeCheckpoint(CheckpointError):
    """The checkpoint asks for something valfree never does: arbitrary unpickling or custom code."""


class CheckpointTooLarge(CheckpointError):
    """Loading the checkpoint would allocate more memory than the budget allows."""


class IncompleteCheckpoint(CheckpointError):
    """A checkpoint folder lacks a file it needs (config, weights, a shard)."""


class NonFinite(CheckpointError):
    """A checkpoint's weights or scores are NaN or infinite: recorded with its own status, never as a result."""


class NonFiniteScore(NonFinite):
    """The probe of a checkpoint came out NaN or infinite (e.g. the model's logits overflow)."""


class NonFiniteWeights(NonFinite):
    """The checkpoint's weights hold NaN or inf: a diverged or corrupted run, never a valid score."""

    def __init__(self, message: str, names: list[str] | None = None):
        super().__init__(message)
        self.names = list(names or [])
