"""The method registry: what decomp knows about each factorization, in one object per method.

A method is a :class:`Method` subclass, instantiated once and passed to :func:`register` in the
file that defines it (``tucker.py``, ``cp.py``, ``svd.py``). Everything specific to it lives
there: which layers it accepts, how its ranks come from the spectra of the kernel's unfoldings,
its closed-form MACs and parameters, the factorization itself, the structural build used when a
saved model is loaded, and the rank grid a budget walks along. The plan, apply, the budget, the
checkpoint loader and the command line only ever ask the registry, so a new method is one new
file (and its tests) with no other module edited.

``auto`` is not a method but a policy over the registry (see :func:`auto_method`): each layer
gets the accepting method of lowest :attr:`Method.auto_priority`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from decomp.factorize.base import Factorized, Whitening

AUTO = "auto"


@dataclass(frozen=True)
class Call:
    """Input and output shapes of one call of a layer (batch 1), as a traced forward sees them."""

    inp: tuple[int, ...]
    out: tuple[int, ...]


@dataclass(frozen=True)
class RankGrid:
    """The ranks a budget may give one layer: grid step ``k`` in ``1..steps`` -> ranks.

    ``ranks(k)`` grows with ``k`` in every rank mode; ``increment`` is how many grid steps the
    allocator moves at a time (coarser on very long grids, so that big layers allocate fast).
    """

    steps: int
    ranks: Callable[[int], list[int]]
    increment: int = 1


class Method:
    """One factorization method. Subclasses set the class attributes and override the methods.

    Rank modes: ``ranks`` is a list with one entry per rank mode of the method (``[r_out,
    r_in]`` for Tucker-2, ``[R]`` for CP and SVD). :meth:`unfoldings` gives the matrices whose
    spectra choose them: entry ``i`` is the mode-``i`` unfolding of the weight (dimension ``i``
    against all the others), and :meth:`combine` turns one rank per unfolding into the
    method's ranks.
    """

    name: ClassVar[str] = ""
    module_types: ClassVar[tuple[type[Factorized], ...]] = ()
    """The modules :meth:`factorize` and :meth:`build` return (recognised on re-decomposition)."""
    auto_priority: ClassVar[int | None] = None
    """Order among the methods ``auto`` may pick (lowest first); None: ``auto`` never picks it."""
    modes: ClassVar[int] = 1
    """How many unfoldings (weight dimensions 0, 1, ...) the rank choice looks at."""
    fits_outputs: ClassVar[bool] = False
    """Whether :meth:`factorize` takes a :class:`~decomp.factorize.base.Whitening` of the
    layer's inputs, to fit its outputs on data instead of its weights."""

    def accepts(self, layer: nn.Module) -> str | None:
        """None when this method can factorize ``layer``, else a sentence saying why not.

        Called only for ungrouped plain ``nn.Conv2d`` and ``nn.Linear`` layers: the plan's
        policy handles grouped convs, exclusions and custom forwards before asking.
        """
        raise NotImplementedError

    def unfoldings(self, weight: Tensor) -> list[Tensor]:
        """Mode-0 .. mode-(modes-1) unfoldings of ``weight``, each (dim_i, rest)."""
        return [unfold(weight, i) for i in range(self.modes)]

    def combine(self, mode_ranks: list[int]) -> list[int]:
        """The method's ranks from one rank per unfolding (identity by default)."""
        return list(mode_ranks)

    def grid(self, layer: nn.Module, points: int) -> RankGrid | None:
        """The rank grid of a budget, about ``points`` long; None: no budget for this method.

        Grid ranks must line up with :meth:`unfoldings` (rank ``i`` bounds mode ``i``), so that
        a budget can estimate the error at each step from the unfoldings' spectra.
        """
        return None

    @property
    def budgets(self) -> bool:
        """Whether a MACs budget can spend on this method (it has a rank grid)."""
        return type(self).grid is not Method.grid

    def costs(
        self, layer: nn.Module, ranks: Sequence[int], calls: Sequence[Call]
    ) -> tuple[int, int]:
        """(MACs as thop counts them over ``calls``, parameters) of the factorized layer."""
        raise NotImplementedError

    def factorize(
        self, layer: nn.Module, ranks: Sequence[int], whitening: Whitening | None = None
    ) -> Factorized:
        """The factorized module, its weights computed from ``layer``'s; with ``whitening``
        (only for methods with :attr:`fits_outputs`), fitted to its outputs on data."""
        raise NotImplementedError

    def build(self, layer: nn.Module, ranks: Sequence[int]) -> Factorized:
        """The factorized module with uninitialised weights (shapes only), for loading."""
        raise NotImplementedError

    def dense(self, module: Factorized) -> nn.Module:
        """The plain layer that one of this method's modules computes (its effective weight,
        bias and hyper-parameters): what a second decomposition re-factorizes at lower ranks,
        so that factorized modules merge instead of nesting."""
        raise NotImplementedError


def unfold(weight: Tensor, mode: int) -> Tensor:
    """The mode-``mode`` unfolding of a weight: dimension ``mode`` against all the others."""
    return weight.movedim(mode, 0).reshape(weight.shape[mode], -1)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` under its name (later registrations of a name replace earlier ones)."""
    if not method.name or method.name == AUTO:
        raise ValueError(f"a method needs a name other than {AUTO!r}; got {method.name!r}")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (for tests that register a toy one)."""
    _REGISTRY.pop(name, None)


def names() -> list[str]:
    """The registered methods: those ``auto`` may pick by priority, then the rest by name."""
    return [m.name for m in sorted(_REGISTRY.values(), key=_display_order)]


def _display_order(method: Method) -> tuple[bool, int, str]:
    priority = method.auto_priority
    return priority is None, priority or 0, method.name


def choices() -> list[str]:
    """What a user may ask for: every registered method, then ``auto``."""
    return [*names(), AUTO]


def get(name: str) -> Method:
    """The registered method called ``name``; a ValueError listing the valid ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(_REGISTRY)}") from None


def check_choice(name: str) -> str:
    """``name`` if it is a method or ``auto``; a ValueError listing the choices otherwise."""
    if name != AUTO and name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(choices())}")
    return name


def auto_method(layer: nn.Module) -> Method | None:
    """The method ``auto`` gives ``layer``: the accepting one of lowest priority, or None."""
    candidates = (get(name) for name in names() if get(name).auto_priority is not None)
    return next((m for m in candidates if m.accepts(layer) is None), None)


def method_of(module: nn.Module) -> Method | None:
    """The registered method whose modules ``module`` is an instance of, if any."""
    return next((m for m in _REGISTRY.values() if type(module) in m.module_types), None)
