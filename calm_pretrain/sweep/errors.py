"""The sweep's one error type (its own module: every stage of the sweep raises it)."""


class SweepError(ValueError):
    """A problem with a sweep file or a plan; the message names the key or file."""
