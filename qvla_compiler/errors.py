"""Every error qvla_compiler raises on purpose is a QvlaError: it says what went wrong and how to fix it."""


class QvlaError(Exception):
    """Base class. Message = what went wrong + how to fix it."""


class RecipeError(QvlaError, ValueError):
    """A recipe, layout or override names something that does not exist or does not fit together."""


class ModelNotFoundError(QvlaError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ExportError(QvlaError, RuntimeError):
    """torch.export could not capture the policy; names the failing op and module path."""


class CalibrationError(QvlaError, ValueError):
    """Calibration data is empty, NaN/Inf, or never reached an observer."""


class ScheduleError(QvlaError, RuntimeError):
    """The lowered program no longer computes the original sequence of ops."""


class ShapeError(QvlaError, ValueError):
    """An op or kernel got tensors of shapes or dtypes it cannot handle."""


class ArtifactError(QvlaError, OSError):
    """A saved program is missing, corrupt, or not a qvla_compiler program."""


class UnsupportedWidthError(QvlaError, ValueError):
    """No Hadamard construction is known for this width."""


class UsageError(QvlaError, ValueError):
    """A command-line option or path that cannot work (conflicting options, an output path that cannot be written)."""


class AccumulatorOverflowError(QvlaError, ValueError):
    """An integer accumulator that no kernel splits could pass int32 (K * qmax_a * qmax_w >= 2**31)."""
