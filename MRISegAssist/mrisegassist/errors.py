"""Exceptions raised by the engine. Every user-facing failure is an :class:`MRISegAssistError`."""


class MRISegAssistError(Exception):
    """Base class: a clear, specific message meant for the user."""


class InputError(MRISegAssistError, ValueError):
    """Bad input (file, volume, prompt, option). Raised before anything is written or modified."""


class CheckpointError(MRISegAssistError):
    """A model checkpoint is missing, corrupted, or does not fit the architecture."""


class Cancelled(MRISegAssistError):
    """The user cancelled a long step. Nothing partial was written."""


class DamagedFileError(InputError):
    """An input file is truncated or inconsistent (header vs. data, compressed stream, CRC)."""


class VolumeTooLargeError(InputError):
    """A volume's header declares more voxels than the configured limit."""


class WriteError(MRISegAssistError):
    """An output could not be written completely and verified; any previous file at that path is kept."""


class InputWarning(UserWarning):
    """Input that is accepted but suspicious (implausible spacing, ignored options, clipped boxes)."""
