"""Detector parameters the scikit-learn way: explicit keyword arguments of ``__init__``, stored
unchanged as attributes, described by constraints and checked in one place.

A detector declares ``parameter_constraints``: parameter name -> :class:`Constraint`. The names
come from the ``__init__`` signature (``get_param_names``); every one of them has a constraint
(the contract test checks it), so a misspelt key, an ill-typed value and an out-of-range value
get the same one-line message from the Python API as from ``--param`` on the command line.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..backbones import available_backbones, is_backbone_name
from ..errors import DefectlensError


class ParameterError(DefectlensError, ValueError):
    """A detector parameter that does not exist, has the wrong type, or is out of range."""


class Constraint:
    """What values a parameter accepts; ``describe`` says it in words for error messages."""

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Integer(Constraint):
    low: int | None = None
    high: int | None = None

    def accepts(self, value):
        return (isinstance(value, int) and not isinstance(value, bool)
                and (self.low is None or value >= self.low) and (self.high is None or value <= self.high))

    def describe(self):
        return "an integer" + _range(self.low, self.high)


@dataclass(frozen=True)
class Real(Constraint):
    low: float | None = None
    high: float | None = None
    #: the low end itself excluded (e.g. a learning rate > 0)
    open_low: bool = False

    def accepts(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def describe(self):
        low = None if self.low is None else (f"> {self.low}" if self.open_low else f">= {self.low}")
        return "a finite number" + _range(None, self.high, low_text=low)


@dataclass(frozen=True)
class Boolean(Constraint):
    def accepts(self, value):
        return isinstance(value, bool)

    def describe(self):
        return "true or false"


@dataclass(frozen=True)
class Choice(Constraint):
    options: tuple

    def accepts(self, value):
        return any(value == option and type(value) is type(option) for option in self.options)

    def describe(self):
        return "one of " + ", ".join(repr(option) for option in self.options)


@dataclass(frozen=True)
class Text(Constraint):
    """Free text: a path, a model id, an object name."""

    def accepts(self, value):
        return isinstance(value, str) and bool(value.strip())

    def describe(self):
        return "a non-empty string"


@dataclass(frozen=True)
class ListOf(Constraint):
    """A non-empty list (or tuple) whose items all satisfy ``item``; ``unique`` forbids repeats."""

    item: Constraint
    unique: bool = True

    def accepts(self, value):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
            return False
        items_ok = all(self.item.accepts(v) for v in value)
        return items_ok and (not self.unique or len(set(map(repr, value))) == len(value))

    def describe(self):
        return f"a non-empty list of {'distinct ' if self.unique else ''}items, each {self.item.describe()}"


@dataclass(frozen=True)
class Params(Constraint):
    """Another detector's parameters, {name: value}; that detector checks the values."""

    def accepts(self, value):
        return isinstance(value, dict) and all(isinstance(key, str) for key in value)

    def describe(self):
        return 'an object {parameter: value}, e.g. {"size": 512}'


@dataclass(frozen=True)
class Optional(Constraint):
    """``inner`` or None (None meaning the method's automatic choice)."""

    inner: Constraint

    def accepts(self, value):
        return value is None or self.inner.accepts(value)

    def describe(self):
        return f"{self.inner.describe()}, or null"


@dataclass(frozen=True)
class BackboneName(Constraint):
    def accepts(self, value):
        return is_backbone_name(value)

    def describe(self):
        return "a backbone name (" + ", ".join(available_backbones()) + ")"


# Constraints of parameters that several methods share, so that one name means one thing.
#: ``seed``: every random choice of a method (held-out images, sampling, initialisation).
SEED = Integer(0, 2**32 - 1)
#: ``size``: the side, in pixels, of the square network input (methods that keep the aspect
#: ratio use about size² pixels). Below 32 no stride-16 grid is left; above 2048 a batch no
#: longer fits a CPU's memory.
INPUT_SIZE = Integer(32, 2048)
#: ``blur_sigma``: Gaussian smoothing of anomaly maps, in input pixels (0 = none).
BLUR_SIGMA = Real(0.0, 64.0)
BACKBONE = BackboneName()
#: ``batch_size``: images (or crops) per network pass.
BATCH_SIZE = Integer(1, 1024)


def _range(low, high, low_text: str | None = None) -> str:
    low_text = low_text or (None if low is None else f">= {low}")
    parts = [p for p in (low_text, None if high is None else f"<= {high}") if p]
    return f" {' and '.join(parts)}" if parts else ""


def get_param_names(cls) -> list[str]:
    """The keyword parameters of ``cls.__init__``, in signature order. ``*args``/``**kwargs`` are
    refused: every parameter must be named so that it can be checked and saved."""
    init = cls.__init__
    if init is object.__init__:
        return []
    names = []
    for name, parameter in inspect.signature(init).parameters.items():
        if name == "self":
            continue
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TypeError(f"{cls.__name__}.__init__ takes *args or **kwargs: name every parameter")
        names.append(name)
    return names


def check_names(method: str, names, accepted: Sequence[str]) -> None:
    unknown = sorted(set(names) - set(accepted))
    if unknown:
        raise ParameterError(f"{method} has no parameter {', '.join(unknown)}; it takes: {', '.join(sorted(accepted))}")


def check_values(method: str, values: dict[str, Any], constraints: dict[str, Constraint]) -> None:
    """Raise :class:`ParameterError` for the first value its constraint does not accept."""
    for name, value in values.items():
        constraint = constraints[name]
        if not constraint.accepts(value):
            # numpy numbers are not stored: a model file holds plain JSON numbers
            hint = "; pass a plain Python number (int(...), float(...))" if type(value).__module__ == "numpy" else ""
            raise ParameterError(f"{method}: {name} must be {constraint.describe()}, not {value!r}{hint}")
