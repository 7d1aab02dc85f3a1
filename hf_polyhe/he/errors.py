"""Errors raised by the encrypted runtime. Every error names the bad value and what would be accepted."""


class HEError(Exception):
    """Base class of all ``hf_polyhe.he`` errors."""


class CircuitError(HEError, ValueError):
    """A malformed circuit: unknown op or version, wrong input count, inconsistent shapes or layouts."""


class LayoutError(HEError, ValueError):
    """A tensor does not fit the packed layout (wrong shape, too many rows for the layout, ...)."""


class PlanningError(HEError, ValueError):
    """No CKKS parameter set can run the circuit (depth beyond any secure set, op deeper than a bootstrap
    segment, ...)."""


class KeyMismatchError(HEError, ValueError):
    """A ciphertext or key belongs to another crypto context or secret key."""


class SerializationError(HEError, ValueError):
    """Bytes or files that are not what they claim to be (corrupted, truncated, wrong kind)."""


class StreamError(HEError, LookupError):
    """An unknown, finished or out-of-order generation stream on a server (prefill twice, decode before prefill,
    past ``max_length``, too many open streams)."""


class RangeViolation(HEError, ArithmeticError):
    """A polynomial or bootstrap input left the interval its approximation is valid on (plain backend,
    ``strict=True``)."""


class BackendUnavailable(HEError, ImportError):
    """The ``openfhe`` backend cannot be used in this interpreter (wrong Python version, missing wheel)."""


class ToyParametersWarning(UserWarning):
    """Emitted whenever the insecure ``toy`` CKKS parameter set is used."""
