"""Typed errors. Each carries enough context to be printed as one line that names what was wrong."""


class FcMoeError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(FcMoeError):
    """A configuration file or value is invalid."""


class LayoutError(FcMoeError):
    """A model does not match the expected expert-unit layout (or cannot be laid out at all)."""


class CodecError(FcMoeError):
    """A tensor on the wire violates its declared name, dtype, shape, size or digest."""


class DataError(FcMoeError):
    """A dataset file or record is malformed."""


class PkiError(FcMoeError):
    """Certificates or keys are missing, unreadable or inconsistent."""


class ProtocolError(FcMoeError):
    """A peer sent a message that is valid on the wire but wrong for the current round state.

    ``status`` names the gRPC status code the aggregator answers with.
    """

    def __init__(self, message: str, status: str = "FAILED_PRECONDITION"):
        super().__init__(message)
        self.status = status


class RunError(FcMoeError):
    """A federation run could not complete (a process died, a time limit passed)."""
