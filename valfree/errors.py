"""The one exception type for user mistakes.

A :class:`ValfreeError` carries a single sentence that says what is wrong, where, and how to fix it.
The CLI prints that sentence and exits non-zero instead of showing a traceback; library callers can
catch it like any other exception. Bugs in valfree itself stay ordinary exceptions so that they are
not mistaken for user errors.
"""


class ValfreeError(ValueError):
    """A problem with the user's input (data, model, checkpoint, option), explained in one sentence."""
