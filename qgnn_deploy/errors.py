"""One exception hierarchy for everything users see.

Every error the package raises on bad input derives from :class:`QGNNError`, so a
service can catch one type. Messages name the file, layer or shape involved and,
where there is one, the fix. The CLI prints them without a traceback (unless
``--debug``) and exits non-zero.
"""


class QGNNError(Exception):
    """Base class of every error raised by qgnn-deploy on bad input or state."""


class ConfigError(QGNNError, ValueError):
    """A model / training / command-line configuration is invalid."""


class CheckpointError(QGNNError):
    """A checkpoint cannot be read or does not fit the model (lists the keys)."""


class ArtifactError(QGNNError):
    """A .qgnn artifact is truncated, corrupt, of another version, or lies about shapes."""


class InputError(QGNNError, ValueError):
    """Inference input of the wrong shape, dtype, size, or with NaN/Inf values."""


class BackendUnavailableError(QGNNError, RuntimeError):
    """A backend (C++ extension, Triton, GPU, onnxruntime) cannot be used here."""


class KernelArgumentError(QGNNError, ValueError):
    """A kernel binding got arguments it cannot run on (dtype, shape, contiguity, bits)."""


class ExportError(QGNNError):
    """A model cannot be expressed in ONNX; names the layer."""


class DataError(QGNNError):
    """A data directory is missing or malformed; says what was expected where."""
