"""carkin's errors: one base class, so callers (the command line among them) can tell a problem
with the input, which carkin explains, from a bug, which keeps its traceback.

Each concrete class also derives from the builtin a caller would expect (``ValueError`` for a bad
value, ``TypeError`` for a wrong type, ``KeyError`` for an unknown name), so ``except ValueError``
keeps working."""


class CarkinError(Exception):
    """Base of every error carkin raises on purpose: bad input, or a numerical failure it can explain."""


class InputError(CarkinError, ValueError):
    """A value given to carkin is invalid; the message names it and says how to fix it."""


class InputTypeError(CarkinError, TypeError):
    """An argument has the wrong type."""


class UnknownNameError(CarkinError, KeyError):
    """A name (parameter, covariate, model...) that does not exist."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
