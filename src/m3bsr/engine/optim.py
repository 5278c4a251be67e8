"""The optimizer: ``torch.optim.Adam`` without its ``torch._dynamo`` import.

Why: ``torch.optim`` guards ``Optimizer.step`` (``_use_grad_for_differentiable``), ``zero_grad``,
``state_dict``, ``load_state_dict`` and ``add_param_group`` so that ``torch.compile`` can trace around
them, and each guard imports ``torch._dynamo`` (with sympy) on its first call. Training here is eager
(``train.compile`` compiles the loss only, never the optimizer), so the guards do nothing but that
import, which costs about 70 MB of resident memory and 2.4 s per process (a tenth of a small run's
peak; benchmarks/memory.py). :class:`EagerAdam` calls the same functions past the guards: every update
and every state dict is ``torch.optim.Adam``'s, bit for bit (tests/test_optim.py), so checkpoints load
into either class.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch.optim import Adam, Optimizer


def _unguarded(method: Callable) -> Callable:
    """The function under a ``torch.optim`` method's wrappers (each keeps what it wraps as ``__wrapped__``).

    ``Adam.step`` may also carry the profiling/hook wrapper that ``Optimizer.__init__`` adds to a class's
    ``step``; :class:`EagerAdam` gets its own, so the optimizer hooks still run once per step."""
    return inspect.unwrap(method)


class EagerAdam(Adam):
    """``torch.optim.Adam`` for eager training; the same arguments, updates and state dicts.

    Not for use inside ``torch.compile``: the graph breaks the guards insert are left out.
    """

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """One Adam update of every parameter with a gradient (``Adam.step``, with grad mode as it sets it)."""
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return _unguarded(Adam.step)(self, closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _unguarded(Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return _unguarded(Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _unguarded(Optimizer.load_state_dict)(self, state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _unguarded(Optimizer.add_param_group)(self, param_group)
