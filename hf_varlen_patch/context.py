"""Where a layer finds the boundaries of the packed forward it runs in.

A patched model's entry derives the :class:`~hf_varlen_patch.boundaries.Boundaries` once per
forward and makes them current (:func:`enter_packed` / :func:`leave_packed`). A layer-level patch
then gets them in one way, :func:`boundaries_for`, whichever way its layer is called: with the
engine's keyword, inside the forward, or replayed by gradient checkpointing after it.

This module depends only on ``boundaries``: attention, recurrent layers and the patches read it
without importing the patching machinery.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .boundaries import Boundaries
from .errors import VarlenPatchError

__all__ = ["BOUNDARIES_KWARG", "boundaries_for", "enter_packed", "enter_traced", "leave_packed", "remember", "carried"]

#: The keyword under which the boundaries travel from the model's entry to every layer.
BOUNDARIES_KWARG = "varlen_boundaries"

_CURRENT: contextvars.ContextVar[Boundaries | None] = contextvars.ContextVar("hf_varlen_boundaries", default=None)
#: The packed forwards running inside compiled code: dynamo cannot trace ``ContextVar.set``, but
#: it traces (and replays after its graph) pushes and pops of a module-level list.
_COMPILED: list[Boundaries] = []
#: How many eager packed forwards are running (any thread): compiled code guards on it, so it
#: looks for an eager forward's context only when there is one.
_EAGER_PACKED = [0]
#: Tensors a layer call will be handed again by a checkpoint replay -> (boundaries, tensor version).
_REPLAYED = WeakIdKeyDictionary()
#: Layers whose last call was packed: a replay of theirs that finds no boundaries is an error.
_LAST_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def boundaries_for(
    call: Mapping[str, Any] | None = None, *, key: Any = None, layer: torch.nn.Module | None = None
) -> Boundaries | None:
    """The boundaries of the packed forward this call belongs to; None when it is not packed.

    The one lookup for patches and engine alike. In order:

    1. ``call[BOUNDARIES_KWARG]``: the engine passes them down as a keyword wherever the model
       forwards its kwargs to attention;
    2. the packed forward running now (so a layer that receives no kwargs still finds them).
       An explicit ``key`` (a tensor the layer's call will be handed again when gradient
       checkpointing replays it: hidden states, a mask, an ALiBi tensor) is remembered for them;
    3. the boundaries remembered for ``key`` (default: the call's ``position_ids``, which the
       entry remembers): a replay outside the forward, such as ``torch.utils.checkpoint`` written
       around a layer by hand. With ``layer``, a replay that finds none after a packed call of that
       layer raises (reentrant checkpointing detaches the tensors it replays).

    ``boundaries_for()`` alone answers "is a packed forward running?".
    """
    if call is not None:
        given = call.get(BOUNDARIES_KWARG)
        if given is not None:
            return given
    current = _current()
    if current is not None:
        if key is not None:
            remember(key, current)
        if layer is not None and not torch.compiler.is_compiling():
            _LAST_PACKED[layer] = True
        return current
    if key is None and call is not None:
        key = call.get("position_ids")
    found = _remembered(key)
    if layer is not None and found is None:
        if _LAST_PACKED.get(layer, False) and torch._C._current_graph_task_id() != -1:
            raise VarlenPatchError(
                f"{type(layer).__name__} is recomputed by reentrant gradient checkpointing, which "
                "hides the packing boundaries; enable checkpointing with use_reentrant=False."
            )
        _LAST_PACKED[layer] = False
    return found


def remember(key: Any, boundaries: Boundaries) -> Any:
    """Tie ``boundaries`` to ``key``, a tensor a layer's call will be handed again on a checkpoint
    replay, for :func:`boundaries_for` to find. By identity, and only while the tensor is unchanged
    in place (a reused buffer with new contents is not the same call), so nothing outlives the
    tensor. Returns ``key``; a non-tensor key is ignored."""
    if isinstance(key, torch.Tensor) and not torch.compiler.is_compiling():
        # compiled graphs replay their own inputs (checkpoint recomputation happens inside the
        # graph), and their traced tensors have no identity to key on
        _REPLAYED[key] = (boundaries, key._version)
    return key


def _remembered(key: Any) -> Boundaries | None:
    if not isinstance(key, torch.Tensor):
        return None
    if torch.compiler.is_compiling():
        # traced tensors have no identity to look up; compiled code never runs outside its forward
        return _current()
    found = _REPLAYED.get(key)
    if found is None or found[1] != key._version:
        return None  # never registered, or changed in place since (a reused buffer)
    return found[0]


def _current() -> Boundaries | None:
    if torch.compiler.is_compiling():  # dynamo traces neither ContextVar.get nor .set
        if _COMPILED:
            return _COMPILED[-1]
        if _EAGER_PACKED[0]:
            # compiled modules inside an eager packed forward (``layer.compile()``) that got no
            # keyword to enter (:func:`enter_traced`): read the context outside the graph (a graph
            # break, only here) rather than miss it
            return _context_boundaries()
        return None
    return _CURRENT.get()


@torch.compiler.disable(reason="a compiled module inside an eager packed forward reads its boundaries")
def _context_boundaries() -> Boundaries | None:
    return _CURRENT.get()


def enter_packed(boundaries: Boundaries) -> Any:
    """Make ``boundaries`` current until :func:`leave_packed` with the returned token: a context
    variable in eager code, a stack that torch.compile can trace in compiled code (so entering a
    packed forward is no graph break)."""
    if torch.compiler.is_compiling():
        _COMPILED.append(boundaries)
        return None
    _EAGER_PACKED[0] += 1
    return _CURRENT.set(boundaries)


def enter_traced(boundaries: Boundaries | None) -> bool:
    """In compiled code that entered no packed forward of its own (a block compiled alone, called
    by an eager packed forward), make ``boundaries``, handed to it as the engine's keyword, current
    for the layers it calls, as :func:`enter_packed` does in a compiled forward: layers that get no
    keyword (recurrent mixers) then find them without reading the context variable, a graph break.
    True if it did; then :func:`leave_packed` with None."""
    if boundaries is None or _COMPILED or not torch.compiler.is_compiling():
        return False
    _COMPILED.append(boundaries)
    return True


def leave_packed(token: Any) -> None:
    if token is None:
        _COMPILED.pop()
    else:
        _EAGER_PACKED[0] -= 1
        _CURRENT.reset(token)


def carried(function: Callable) -> Callable:
    """``function`` bound to the packed forward running now: called later (a checkpoint's
    recomputation during backward), it runs as if inside that forward."""
    context = contextvars.copy_context()

    def rerun(*args: Any, **kwargs: Any) -> Any:
        # compiled layers look for an eager forward's context only while one runs (_current)
        _EAGER_PACKED[0] += 1
        try:
            return context.run(function, *args, **kwargs)
        finally:
            _EAGER_PACKED[0] -= 1

    return rerun
