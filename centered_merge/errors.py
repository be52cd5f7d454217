"""Exceptions raised by centered_merge.

Every error that comes from bad input names what it is about (the file or model, the tensor, the parameter),
so a user can act on it without reading a traceback.
"""


class MergeError(ValueError):
    """A merge cannot go ahead: bad inputs, bad parameters or a failed write."""


class MergeConfigError(MergeError):
    """A method parameter, a config file entry or a CLI option is invalid."""


class MergeInputError(MergeError):
    """The models to merge do not fit together (keys, shapes, dtypes) or hold bad values."""


class MergeOutputError(MergeError):
    """The output cannot be written: the path exists, the disk is full, a write failed."""
