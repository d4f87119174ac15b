"""Errors a user can act on.

Every error raised on bad input names what is wrong, where (file, key, argument) and
what to do about it. They derive from ``ValueError`` so that callers that already catch
bad-input errors keep working.
"""


class SpiritLMEdgeError(ValueError):
    """Base class: bad input, a bad checkpoint or bundle, or a missing dependency."""


class CheckpointError(SpiritLMEdgeError):
    """A checkpoint file is missing, unreadable, or not in the release's format."""


class BundleError(SpiritLMEdgeError):
    """A bundle directory is incomplete, corrupted or built for something else."""


class AudioError(SpiritLMEdgeError):
    """Audio input that cannot be turned into speech units."""


class UnitsError(SpiritLMEdgeError):
    """A unit string or unit id outside the model's vocabulary."""


class ModelError(SpiritLMEdgeError):
    """A language-model input or setting the model cannot honour."""
