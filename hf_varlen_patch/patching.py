"""Reversible, instance-bound changes, and the entry wrapper that builds boundaries once.

Everything `apply` changes goes through a :class:`Patcher`, which records how to undo it, so
`unapply` restores the instance exactly (same objects, same attributes).
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import packed_mask_placeholder
from .boundaries import Boundaries, check_seq_idx
from .calls import batch_shape, cache_of
from .context import BOUNDARIES_KWARG, boundaries_for, carried, enter_packed, leave_packed, remember
from .errors import (
    MalformedBatchError,
    MalformedBoundariesError,
    PackedCallError,
    PackedOutputAttentionsError,
    VarlenPatchError,
)
from .guards import CROSS_ATTENTION, refuse_unpackable
from .sequence_parallel import LAYOUT_KEY, sharded_boundaries, stream_targets, with_stream_loss
from .unpad import plan_unpadding, scatter_outputs, unpadded_call


class _Missing:
    """ "No such attribute before the patch"; one object, also through ``copy.deepcopy``."""

    def __deepcopy__(self, memo: dict) -> _Missing:
        return self

    def __copy__(self) -> _Missing:
        return self


_MISSING = _Missing()
#: Instance attribute holding, per wrapped name, the methods that wrappers wrap (bound to it).
_WRAPPED = "_hf_varlen_wrapped"

#: kwargs of DataCollatorWithFlattening(return_flash_attn_kwargs=True).
COLLATOR_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def refuse_sharded_losses(instance: Any, call: dict, head: str, shifts_labels: bool) -> None:
    """Under sequence parallel a rank's loss must be its share of the whole stream's: labels
    shifted over the stream and divided by the global target count (transformers' loss function
    with ``shift_labels`` and ``num_items_in_batch``). Losses computed otherwise, and the MoE
    load-balancing loss (a function of every token's routing), are refused."""
    if isinstance(call.get("labels"), torch.Tensor):
        if head != "causal_lm" or not shifts_labels:
            raise MalformedBatchError(
                f"{type(instance).__name__} computes its loss inline, as a mean over this rank's slice; under "
                "sequence parallel call it without labels and compute the loss from the logits with the "
                "shift_labels and num_items_in_batch that shard_packed_batch gives."
            )
        if call.get("shift_labels") is None:
            raise MalformedBatchError(
                "under sequence parallel the labels must be shifted over the whole stream (the last token of a "
                "slice predicts the first of the next): pass the shift_labels that shard_packed_batch gives."
            )
    router = call.get("output_router_logits")
    if router is None:
        config = getattr(instance, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        router = getattr(text, "output_router_logits", False)
    if router:
        raise MalformedBatchError(
            "under sequence parallel each rank sees its slice's router logits only, and the load-balancing loss "
            "depends on every token's routing: pass output_router_logits=False (and add an auxiliary loss from "
            "router logits gathered over the ranks yourself)."
        )


def _carries_offsets(call: dict) -> bool:
    return call.get("cu_seq_lens_q") is not None or call.get("cu_seq_lens_k") is not None


#: What the KV cache argument is called: ``past_key_values`` up to 5.23, ``cache`` from 5.24;
#: ``past_key_value`` in some 4.57 attention classes.
@dataclass
class RestoreAttr:
    """Undo record: put ``obj.name`` back to ``old`` (or remove it). A record, not a closure, so
    that ``copy.deepcopy`` of a patched model maps it onto the copy (and ``unapply`` of the copy
    restores the copy)."""

    obj: Any
    name: str
    old: Any
    #: restore only while the attribute still holds this (what the patch set); _MISSING: always
    new: Any = _MISSING

    def __call__(self) -> None:
        if self.new is not _MISSING and getattr(self.obj, self.name, _MISSING) != self.new:
            return  # changed since by someone else: theirs stands
        if self.old is _MISSING:
            if self.name in vars(self.obj):
                delattr(self.obj, self.name)
        else:
            setattr(self.obj, self.name, self.old)


@dataclass
class CallOnUndo:
    """Undo record: ``fn(*args)``; ``args`` are deep-copied with the model, ``fn`` is shared."""

    fn: Callable[..., None]
    args: tuple = ()

    def __call__(self) -> None:
        self.fn(*self.args)


class UnpatchedState:
    """An instance's ``__getstate__`` while it is patched: its state as it was before the patch
    (every attribute the patch set back to its old value, or left out), so that ``pickle``,
    ``torch.save`` and ``copy.deepcopy`` of a patched model never carry wrappers, routes or patch
    state that refer to the original (the top model re-applies the patch itself on load and copy).
    Attributes marked ``keep`` (a model's private config) keep their current value."""

    def __init__(self, obj: Any, previous: Any) -> None:
        self.obj = obj
        self.previous = previous if isinstance(previous, UnpatchedState) else None
        self.originals: dict[str, Any] = {}
        self.kept: set[str] = set()

    def remember(self, name: str, old: Any, keep: bool) -> None:
        if name not in self.originals and name not in self.kept:
            if keep:
                self.kept.add(name)
            else:
                self.originals[name] = old

    def __call__(self) -> dict:
        if self.previous is not None:
            state = self.previous()
        else:
            getstate = getattr(type(self.obj), "__getstate__", None)
            state = dict(getstate(self.obj) if getstate is not None else vars(self.obj))
            state.pop("__getstate__", None)
        for name, old in self.originals.items():
            if old is _MISSING:
                state.pop(name, None)
            else:
                state[name] = old
        for name, value in list(state.items()):
            if isinstance(value, _CheckpointCarryingBoundaries):
                state[name] = value.inner
        return state

    def __deepcopy__(self, memo: dict) -> None:  # never part of a copied state
        return None


def _carries_state(obj: Any) -> bool:
    """Modules get an :class:`UnpatchedState`; configs do not (their ``__dict__`` is what they
    serialise): a copied config's routed attention name is undone when the copy is patched."""
    return isinstance(obj, torch.nn.Module)


@dataclass
class Patcher:
    """Records instance-level changes so that they can be undone in reverse order."""

    undo_log: list[Callable[[], None]] = field(default_factory=list)
    own_hooks: set[int] = field(default_factory=set)

    def set_attr(self, obj: Any, name: str, value: Any, *, unless_changed: bool = False, keep: bool = False) -> None:
        """``obj.name = value``, undone by restoring the old value (or removing it); with
        ``unless_changed`` only while ``obj.name`` still equals ``value`` at undo time. Pickled or
        deep-copied, ``obj`` shows the old value (:class:`UnpatchedState`), or, with ``keep``, this one."""
        old = vars(obj)[name] if name in vars(obj) else _MISSING
        if _carries_state(obj):
            self._state_of(obj).remember(name, old, keep)
        setattr(obj, name, value)
        self.undo_log.append(RestoreAttr(obj, name, old, value if unless_changed else _MISSING))

    def _state_of(self, obj: Any) -> UnpatchedState:
        hook = vars(obj).get("__getstate__")
        if isinstance(hook, UnpatchedState) and hook.obj is obj and id(hook) in self.own_hooks:
            return hook
        new = UnpatchedState(obj, hook)
        self.own_hooks.add(id(new))
        old = hook if "__getstate__" in vars(obj) else _MISSING
        object.__setattr__(obj, "__getstate__", new)
        self.undo_log.append(RestoreAttr(obj, "__getstate__", old))
        return new

    def wrap_method(self, obj: Any, name: str, wrapper: Callable) -> None:
        """Wrap ``obj.name`` for this instance only: ``wrapper(wrapped, instance, args, kwargs)``.

        The patched attribute is a bound method of ``obj`` (a plain function underneath, which
        torch.compile traces; dynamo cannot trace wrapt's proxies), and the method it wraps is kept
        on the instance, not in a closure. ``inspect.signature`` sees the wrapped method's
        parameters (Trainer's column pruning, PEFT). (``copy.deepcopy`` of a patched model copies
        the unpatched model and patches the copy: see ``api._deepcopy_patched``.)
        """
        previous = getattr(obj, name)
        if _WRAPPED not in vars(obj):
            self.set_attr(obj, _WRAPPED, {})
        chain = vars(obj)[_WRAPPED].setdefault(name, [])
        level = len(chain)
        chain.append(previous)
        self.undo_log.append(CallOnUndo(list.pop, (chain,)))

        def patched(instance: Any, *args: Any, **kwargs: Any) -> Any:
            return wrapper(getattr(instance, _WRAPPED)[name][level], instance, args, kwargs)

        patched.__code__ = _code_for(type(obj), name, level, wrapper, patched.__code__)
        functools.update_wrapper(patched, previous)
        signature = inspect.signature(previous)
        own = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        patched.__signature__ = signature.replace(parameters=[own, *signature.parameters.values()])
        self.set_attr(obj, name, types.MethodType(patched, obj))

    def undo(self) -> None:
        while self.undo_log:
            self.undo_log.pop()()


_CODES: dict[tuple, types.CodeType] = {}


def _code_for(cls: type, name: str, level: int, wrapper: Callable, code: types.CodeType) -> types.CodeType:
    """One code object per (class, method, level, wrapper) for :meth:`Patcher.wrap_method`'s
    ``patched``: torch.compile caches compiled frames per code object, and its recompile limit (8)
    counts them per code object too, so a shared ``patched`` would run eagerly past the 8th kind of
    call. The decoder layers of one class share theirs."""
    key = (cls, name, level, getattr(wrapper, "__code__", type(wrapper)))  # partials: by type, not per object
    if key not in _CODES:
        _CODES[key] = code.replace()
    return _CODES[key]


def nested_configs(config: Any) -> list[Any]:
    """The config and every sub-config reachable from it (text_config, vision_config, ...)."""
    from transformers import PretrainedConfig

    found, stack = [], [config]
    while stack:
        current = stack.pop()
        if any(current is f for f in found):
            continue
        found.append(current)
        stack.extend(v for v in vars(current).values() if isinstance(v, PretrainedConfig))
    return found


def own_config(model: torch.nn.Module, patcher: Patcher) -> dict[int, Any]:
    """Give ``model`` a private copy of its config (and sub-configs), rebinding every submodule.

    transformers shares one config object between models built from it, so changing
    ``_attn_implementation`` in place would patch every sibling model too.
    Returns a map from id(old config) to its copy.
    """
    olds = nested_configs(model.config)
    new_root = copy.deepcopy(model.config)
    news = nested_configs(new_root)
    mapping = {id(o): n for o, n in zip(olds, news)}
    patcher.undo_log.append(CallOnUndo(_write_back_edits, (list(zip(olds, news)), [_config_items(n) for n in news])))
    for module in model.modules():
        for attr, value in list(vars(module).items()):
            if id(value) in mapping and any(value is o for o in olds):
                patcher.set_attr(module, attr, mapping[id(value)], keep=True)
    return mapping


def _config_items(config: Any) -> dict:
    from transformers import PretrainedConfig

    return {k: copy.deepcopy(v) for k, v in vars(config).items() if not isinstance(v, PretrainedConfig)}


def _write_back_edits(pairs: list[tuple[Any, Any]], snapshots: list[dict]) -> None:
    """On ``unapply``: the edits made to the private config after ``apply`` go to the config the
    model had before, as if they had been made there (the patch's own changes are undone first)."""
    for (old, new), before in zip(pairs, snapshots):
        for key, value in _config_items(new).items():
            try:
                same = key in before and bool(before[key] == value)
            except Exception:  # values that do not compare to a bool (arrays): count as edited
                same = False
            if not same:
                setattr(old, key, value)


def call_as_kwargs(fn: Callable, args: tuple, kwargs: dict) -> dict:
    """Bind positional arguments to their names so the wrapper can read and edit them."""
    if not args:
        return dict(kwargs)
    names = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) > len(names):
        raise TypeError(f"{fn.__qualname__} got {len(args)} positional arguments, takes {len(names)}")
    call = dict(zip(names, args))
    call.update(kwargs)
    return call


def _cache_is_empty(past: Any) -> bool:
    if past is None:
        return True
    get_len = getattr(past, "get_seq_length", None)
    if get_len is None:
        return False
    return int(get_len()) == 0


def boundaries_for_call(call: dict, *, check_inputs: bool, rows_are_sequences: bool = False) -> Boundaries | None:
    """The boundaries of one forward, or None when the input is not packed (run upstream as is).

    ``rows_are_sequences``: also treat a batch of several rows, each one sequence (plus padding),
    as packed when its cache is empty, for models whose upstream lets rows influence each other.
    """
    shape = batch_shape(call)
    cu_q, cu_k = call.get("cu_seq_lens_q"), call.get("cu_seq_lens_k")
    if shape is None:
        if cu_q is not None or cu_k is not None:
            raise MalformedBoundariesError("cu_seq_lens_q/k given without input_ids or inputs_embeds.")
        return None
    if cu_q is not None or cu_k is not None:
        if not _cache_is_empty(cache_of(call)):
            raise VarlenPatchError("packed inputs (cu_seq_lens_q/k) need an empty cache (past_key_values).")
        max_len = call.get("max_length_q")
        if max_len is None:
            max_len = call.get("max_length_k")
        mask = call.get("attention_mask")
        return Boundaries.from_cu_seqlens(
            cu_q if cu_q is not None else cu_k,
            max_len,
            shape=shape,
            check=check_inputs,
            cu_seqlens_k=cu_k if cu_q is not None and cu_k is not cu_q else None,
            attention_mask=mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None,
            position_ids=_text_positions_to_check(call.get("position_ids"), shape) if check_inputs else None,
            seq_idx=call.get("seq_idx") if check_inputs else None,
        )
    position_ids = call.get("position_ids")
    if position_ids is None or shape[1] <= 1:
        return None
    mask = call.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim != 2:
        return None  # a custom 4-D mask: the caller built the attention pattern, respect it.
    boundaries = _boundaries_from_positions(position_ids, shape, mask, cache_of(call), rows_are_sequences)
    if boundaries is not None and check_inputs and isinstance(call.get("seq_idx"), torch.Tensor):
        check_seq_idx(call["seq_idx"], boundaries)
    return boundaries


def _text_positions_to_check(position_ids: Any, shape: tuple[int, int]) -> torch.Tensor | None:
    """The (B|1, T) positions to hold against collator offsets: 2-D ids, or the text row of
    transformers' packed (4, B, T) rotary layout (3-D rotary rows are checked per sample elsewhere)."""
    if not isinstance(position_ids, torch.Tensor):
        return None
    if position_ids.ndim == 3 and position_ids.shape[0] == 4:
        position_ids = position_ids[0]
    if position_ids.ndim == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.ndim != 2 or position_ids.shape[1] != shape[1] or position_ids.shape[0] not in (1, shape[0]):
        return None
    return position_ids


@torch.compiler.disable(reason="packing is read from position_ids on the host; pass cu_seq_lens_q/k to avoid it")
def _boundaries_from_positions(
    position_ids: torch.Tensor, shape: tuple[int, int], mask: Any, cache: Any, rows_are_sequences: bool
) -> Boundaries | None:
    boundaries = Boundaries.from_position_ids(position_ids, shape=shape, attention_mask=mask)
    if not boundaries.is_packed:
        if rows_are_sequences and shape[0] > 1 and _cache_is_empty(cache):
            return boundaries
        return None
    if not _cache_is_empty(cache):
        raise VarlenPatchError(
            "position_ids restart inside a row while past_key_values already holds tokens; packed "
            "batches need an empty cache (pass use_cache=False or a fresh cache)."
        )
    return boundaries


def mask_boundary_labels(labels: torch.Tensor, boundaries: Boundaries, *, shifted_inside: bool = True) -> torch.Tensor:
    """Labels with -100 where a loss term would predict across a boundary: at every sequence
    start for models that shift labels inside their loss, at every sequence end for models whose
    ``labels[t]`` is the target of ``logits[t]`` (a row shifted as a whole)."""
    if labels.shape != torch.Size(boundaries.shape):
        return labels
    where = boundaries.sequence_starts() if shifted_inside else boundaries.cu_seqlens[1:].to(torch.int64) - 1
    masked = labels.clone()
    masked.view(-1).index_fill_(0, where.to(labels.device), -100)
    return masked


def track_layer(patcher: Patcher, layer: torch.nn.Module) -> None:
    """Make the packed forward's boundaries current inside ``layer`` during checkpoint
    recomputation (:func:`~hf_varlen_patch.context.boundaries_for` keyed on the layer's first
    tensor argument).

    transformers' own checkpointing needs no tracking: the engine reruns every checkpointed module
    inside the packed forward's context (:func:`carry_boundaries_through_checkpoints`). This is
    for checkpoint wrappers outside transformers (``torch.utils.checkpoint`` around a layer by
    hand), which replay the layer's instance ``forward`` with the same first tensor.
    """

    def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        outer = boundaries_for()
        boundaries = boundaries_for(key=first, layer=instance)
        if outer is not None or boundaries is None:
            return wrapped(*args, **kwargs)
        token = enter_packed(boundaries)
        try:
            return wrapped(*args, **kwargs)
        finally:
            leave_packed(token)

    patcher.wrap_method(layer, "forward", wrapper)


class _CheckpointCarryingBoundaries:
    """A module's ``_gradient_checkpointing_func`` that reruns the checkpointed function in the
    context of the packed forward that called it (its boundaries, and any other context a patch
    keeps), so the recomputation during backward, outside the forward, sees them again: whether
    it runs the instance's forward (transformers 4.x) or the layer's *class* forward (5.x),
    reentrant or not."""

    def __init__(self, inner: Callable) -> None:
        self.inner = inner

    def __call__(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        if boundaries_for() is None or torch.compiler.is_compiling():  # a graph recomputes from its inputs
            return self.inner(function, *args, **kwargs)
        return self.inner(carried(function), *args, **kwargs)


_CARRIER = "_gradient_checkpointing_func"


def _take_off_carriers(modules: list[torch.nn.Module]) -> None:
    for module in modules:
        current = vars(module).get(_CARRIER)
        if isinstance(current, _CheckpointCarryingBoundaries):
            setattr(module, _CARRIER, current.inner)


def carry_boundaries_through_checkpoints(patcher: Patcher, model: torch.nn.Module) -> None:
    """Make every checkpointed module of ``model`` recompute inside the packed forward's context.

    The engine does this for every patched model, so no entry keys boundaries on what a layer's
    call replays just for checkpointing. transformers sets ``_gradient_checkpointing_func`` on
    each module with a ``gradient_checkpointing`` attribute (layers, or a base model whose loop
    checkpoints its blocks) when checkpointing is enabled, before ``apply`` (wrapped here) or after
    (wrapped as the model's ``_set_gradient_checkpointing`` sets them); ``unapply`` takes them off.
    """
    modules = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    if not modules:
        return

    def install() -> None:
        for module in modules:
            current = vars(module).get(_CARRIER)
            if current is not None and not isinstance(current, _CheckpointCarryingBoundaries):
                setattr(module, _CARRIER, _CheckpointCarryingBoundaries(current))

    def after_setting(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        result = wrapped(*args, **kwargs)
        install()
        return result

    patcher.undo_log.append(CallOnUndo(_take_off_carriers, (modules,)))
    install()  # checkpointing enabled before apply
    # enabled after apply: gradient_checkpointing_enable / activation_checkpointing_enable (4.57 and
    # 5.x, called on the model or its base model) set every module's function through this method;
    # hooking it, not the forward, keeps compiled forwards free of one more graph break
    base = getattr(model, "base_model", model)
    for target in (model,) if base is model else (model, base):
        if hasattr(target, "_set_gradient_checkpointing"):
            patcher.wrap_method(target, "_set_gradient_checkpointing", after_setting)


#: ``handler(wrapped, instance, call, boundaries)`` for :func:`wrap_packed_calls`.
PackedHandler = Callable[[Callable, Any, dict, Boundaries], Any]


def wrap_packed_calls(
    patcher: Patcher,
    module: Any,
    name: str,
    handler: PackedHandler,
    *,
    find: Callable[[Any, dict], Boundaries | None] | None = None,
    cross_attention: Iterable[str] = CROSS_ATTENTION,
) -> None:
    """Wrap ``module.name`` (an attention module's ``forward`` or ``_attn``) so that its packed
    calls run ``handler(wrapped, instance, call, boundaries)``, ``call`` holding the arguments by
    name, once :func:`~hf_varlen_patch.guards.refuse_unpackable` has refused what they cannot
    honour; unpacked calls run the original untouched. ``find(instance, call)`` looks the
    boundaries up (default: :func:`~hf_varlen_patch.context.boundaries_for` of the call)."""

    def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        call = call_as_kwargs(wrapped, args, kwargs)
        boundaries = boundaries_for(call) if find is None else find(instance, call)
        if boundaries is None:
            return wrapped(*args, **kwargs)
        refuse_unpackable(call, cross_attention=cross_attention)
        return handler(wrapped, instance, call, boundaries)

    patcher.wrap_method(module, name, wrapper)


def attach_boundaries(
    patcher: Patcher, module: torch.nn.Module, extra: Callable[[torch.nn.Module], dict] | None = None
) -> None:
    """Wrap ``module.forward`` so a packed call carries ``varlen_boundaries`` (and ``extra(module)``).

    For attention modules that call the AttentionInterface but whose callers drop the keyword
    arguments. The boundaries come from :func:`~hf_varlen_patch.context.boundaries_for` (its kwargs,
    the packed forward running now, or its ``position_ids`` on a checkpoint replay; register the
    enclosing layers with :func:`track_layer` so a replay by hand sees them too). Unpacked calls
    pass through unchanged.
    """

    def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        boundaries = boundaries_for(kwargs) or boundaries_for(call_as_kwargs(wrapped, args, kwargs))
        if boundaries is None:
            return wrapped(*args, **kwargs)
        kwargs = {**kwargs, BOUNDARIES_KWARG: boundaries}
        if extra is not None:
            kwargs.update(extra(instance))
        return wrapped(*args, **kwargs)

    patcher.wrap_method(module, "forward", wrapper)


def index_positions_per_sequence(patcher: Patcher, module: torch.nn.Module) -> None:
    """Make a position-embedding module that numbers a row's tokens 0..T-1 (an ``arange`` inside
    the model, ignoring ``position_ids``) restart at every sequence start in packed forwards.

    Its output for a row holds the embeddings of positions 0..T-1 along dim -2; a packed forward
    gathers, for each token, the row of its position within its own sequence (never beyond its
    flat index, so always present). Works for learned, sinusoidal and offset tables alike; the
    module's output is unchanged in unpacked forwards.
    """

    def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        boundaries = boundaries_for()
        try:
            out = wrapped(*args, **kwargs)
        except IndexError as err:
            if boundaries is None:
                raise
            size = getattr(instance, "num_embeddings", None)
            raise VarlenPatchError(
                f"{type(instance).__name__} numbers the whole packed row of {boundaries.shape[1]} tokens before "
                f"the positions restart per sequence, and its table{f' ({size} rows)' if size else ''} is shorter; "
                "pack rows no longer than the model's max_position_embeddings."
            ) from err
        if boundaries is None or out.ndim < 2:
            return out
        batch, length = boundaries.shape
        if out.shape[-2] != length:
            raise VarlenPatchError(
                f"{type(instance).__name__} returned {out.shape[-2]} positions for rows of {length} tokens in a "
                "packed forward; packed inputs need an empty cache."
            )
        positions = boundaries.position_ids().to(out.device)
        table = out.reshape(-1, length, out.shape[-1]) if out.ndim == 2 else out
        table = table.expand(batch, length, out.shape[-1]) if table.shape[0] == 1 else table
        index = positions.unsqueeze(-1).expand(batch, length, out.shape[-1])
        return table.gather(1, index)

    patcher.wrap_method(module, "forward", wrapper)


def make_entry_wrapper(
    *,
    check_inputs: bool,
    is_base: bool,
    is_top: bool,
    passes_kwargs: bool,
    shifts_labels: bool = True,
    rows_are_sequences: bool = False,
    takes_position_ids: bool = True,
    takes_seq_idx: bool = True,
    head: str = "causal_lm",
    check_route: Callable[[Any], None] | None = None,
    unpad: bool = False,
    sequence_parallel: Any = None,
) -> Callable:
    """The wrapper (:meth:`Patcher.wrap_method`) around a patched model's ``forward``.

    It derives the boundaries once (or takes them from an outer patched forward) and passes them
    down as a keyword argument. In packed mode the base model gets a zero-memory 4-D mask (or,
    for models that take no kwargs, no mask), so transformers never builds a (T, T) mask.
    A forward that takes no ``position_ids`` (older encoder-decoder causal LMs) still accepts
    them, and the collator's kwargs, from the caller: the boundaries reach its layers through the
    context instead. Unpacked calls go through untouched.

    Under torch.compile the wrapper is traced like the model's own code: with the collator's
    ``cu_seq_lens_*`` (or boundaries passed in) nothing breaks the graph; deriving boundaries
    from ``position_ids`` alone reads them on the host, which is one graph break at the entry.

    ``head`` (:data:`~hf_varlen_patch.heads.HEAD_KINDS`, for the top model) says what a packed row
    means for its outputs and labels; ``check_route(model)`` raises when the model no longer takes
    the patched route (checked at every packed call of the top model). ``unpad``: a padded call
    without a cache, made to the outermost patched forward, runs its real tokens packed
    (:mod:`hf_varlen_patch.unpad`): from the top model the head and the loss run on real tokens
    only; a caller that runs the base model itself (TRL's fused log-prob head) gets the same.
    ``sequence_parallel`` (a :class:`~hf_varlen_patch.SequenceParallel`): packed calls carry one
    rank's slice of a stream (:func:`hf_varlen_patch.sequence_parallel.shard_packed_batch`); their boundaries are the
    slice's, with the stream's global ones for attention.
    """

    def prepare(call: dict, instance: Any) -> Boundaries | None:
        """Edit ``call`` for a packed forward and return its boundaries (None: not packed)."""
        # From an outer patched forward (kwarg or context), never from an earlier forward: a caller
        # may reuse the same position_ids tensor with new contents.
        boundaries = call.pop(BOUNDARIES_KWARG, None) or boundaries_for()
        if boundaries is None:
            if sequence_parallel is not None and _carries_offsets(call):
                boundaries = sharded_boundaries(call, sequence_parallel, check_inputs=check_inputs)
            else:
                boundaries = boundaries_for_call(call, check_inputs=check_inputs, rows_are_sequences=rows_are_sequences)
                if boundaries is None:
                    return None
                if sequence_parallel is not None and boundaries.is_packed:
                    raise MalformedBatchError(
                        "this model is patched for sequence parallel, and a packed batch reached it without the "
                        "stream's global offsets: each rank would attend within its own slice only. Shard the "
                        "packed batch with hf_varlen_patch.shard_packed_batch."
                    )
            for name in (*COLLATOR_KWARGS, LAYOUT_KEY):
                call.pop(name, None)
        if not takes_seq_idx:
            call.pop("seq_idx", None)  # TRL's padding-free collator sends it; the boundaries replace it
        if call.get("position_ids") is None:
            call["position_ids"] = boundaries.position_ids()
        remember(call["position_ids"], boundaries)
        if passes_kwargs:
            call[BOUNDARIES_KWARG] = boundaries
        sharded = getattr(boundaries, "shard", None) is not None
        if sharded and is_top:
            refuse_sharded_losses(instance, call, head, shifts_labels)
        elif is_top and head == "causal_lm" and isinstance(call.get("labels"), torch.Tensor):
            call["labels"] = mask_boundary_labels(call["labels"], boundaries, shifted_inside=shifts_labels)
        if is_base:
            batch, length = boundaries.shape
            call["attention_mask"] = (
                packed_mask_placeholder(batch, length, boundaries.device) if passes_kwargs else None
            )
        return boundaries

    def entry(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        call = call_as_kwargs(wrapped, args, kwargs)
        refuse_packed_cache_reuse(call)
        # the keyword first: in a frame compiled after a graph break, the context's boundaries are a
        # global (static shapes: a recompile per length), the keyword's an input (dynamic)
        outer = call.get(BOUNDARIES_KWARG) is not None or boundaries_for() is not None
        plan = plan_unpadding(call) if unpad and not outer else None
        if plan is not None:
            call = unpadded_call(call, plan)
        boundaries = prepare(call, instance)
        if not takes_position_ids:
            # the model numbers its tokens itself; in packed forwards the boundaries travel in the context
            call.pop("position_ids", None)
            kwargs.pop("position_ids", None)
        if boundaries is None:
            return wrapped(*args, **kwargs)
        if is_top and check_route is not None:
            check_route(instance)
        # rows_are_sequences batches (one sequence per row) need none of this: rows stay rows
        if not outer and boundaries.is_packed:
            refuse_packed_outputs(instance, call, head if is_top else "base")
            remember_packed_cache(call)
        if is_top and head == "sequence_classification" and boundaries.is_packed:
            out = classify_sequences(wrapped, instance, call, boundaries)
            return out if plan is None else scatter_outputs(out, plan, pooled=True)
        targets = stream_targets(call) if is_top and getattr(boundaries, "shard", None) is not None else None
        token = enter_packed(boundaries)
        try:
            out = wrapped(**call)
        finally:
            leave_packed(token)
        if targets is not None:
            out = with_stream_loss(out, targets, boundaries.shard, whole_stream=not instance.training)
        return out if plan is None else scatter_outputs(out, plan, pooled=head == "sequence_classification")

    return entry


#: Caches that a packed forward wrote into: their entries mix the row's sequences.
_PACKED_CACHES: weakref.WeakSet = weakref.WeakSet()


def remember_packed_cache(call: dict) -> None:
    cache = cache_of(call)
    if cache is not None and not torch.compiler.is_compiling():
        try:
            _PACKED_CACHES.add(cache)
        except TypeError:  # not weak-referenceable (a legacy tuple cache): nothing to reuse it by
            pass


def refuse_packed_cache_reuse(call: dict) -> None:
    """A cache filled by a packed forward holds every sequence of its row as one; continuing from
    it (``generate`` on a packed prompt) would attend across them."""
    cache = cache_of(call)
    if cache is None or torch.compiler.is_compiling():
        return
    try:
        reused = cache in _PACKED_CACHES and not _cache_is_empty(cache)
    except TypeError:
        return
    if reused:
        raise PackedCallError(
            "this cache was filled by a packed forward (position_ids restarting inside a row), so it holds "
            "several sequences as one: decoding from it would attend across them. Generate from one sequence "
            "per row (a padded batch with an attention_mask), not from a packed prompt."
        )


def _output_attentions(instance: Any, call: dict) -> bool:
    asked = call.get("output_attentions")
    if asked is None:
        asked = getattr(getattr(instance, "config", None), "output_attentions", False)
    return bool(asked)


def refuse_packed_outputs(instance: Any, call: dict, head: str) -> None:
    """Refuse what a packed call cannot give exactly: attention weights, span losses over a row,
    heads that pool a row into one result some other way."""
    if _output_attentions(instance, call):
        raise PackedOutputAttentionsError(
            "output_attentions=True is not available with packed inputs: the varlen kernels build no "
            "attention matrix. Run the sequences as a padded batch (one per row) to read attention weights."
        )
    if head == "question_answering" and any(call.get(k) is not None for k in ("start_positions", "end_positions")):
        raise PackedCallError(
            f"{type(instance).__name__}'s span loss takes one start/end position per row, and a packed row holds "
            "several sequences. Compute the loss per sequence from the (exact, per-token) start/end logits, or "
            "run one sequence per row."
        )
    if head == "other":
        raise PackedCallError(
            f"{type(instance).__name__} is not a head hf_varlen_patch can run packed (causal LM, sequence or token "
            "classification, question answering, masked LM, or the base model): run it on unpacked batches."
        )


def classify_sequences(wrapped: Callable, instance: Any, call: dict, boundaries: Boundaries) -> Any:
    """A sequence-classification head on a packed batch: one score per real sequence, pooled at
    its own last token (see :mod:`hf_varlen_patch.heads`); ``labels`` hold one label per sequence.

    Upstream refuses rows > 1 without a ``pad_token_id`` (it cannot find a row's last token); the
    rows are then run as one flat row, which the packed path computes identically (rows never
    merge), and the outputs per token come back as (B, T).
    """
    from .heads import captured_outputs, check_sequence_labels, per_token_scores, pool_sequences, real_sequences

    config = instance.config.get_text_config() if hasattr(instance.config, "get_text_config") else instance.config
    pad_token_id = getattr(config, "pad_token_id", None)
    labels = call.pop("labels", None)
    input_ids, mask = call.get("input_ids"), call.get("attention_mask")
    batch, length = boundaries.shape
    flat = boundaries
    if pad_token_id is None and batch > 1:
        flat = Boundaries(boundaries.cu_seqlens, boundaries.max_seqlen, boundaries.seq_idx, (1, batch * length))
        call = {k: _as_one_row(v, boundaries.shape) for k, v in call.items()}
        if BOUNDARIES_KWARG in call:
            call[BOUNDARIES_KWARG] = flat
    if labels is not None:
        real = real_sequences(boundaries, input_ids, mask, pad_token_id)
        check_sequence_labels(labels, int(real.sum()), instance)

    def run() -> Any:
        token = enter_packed(flat)
        try:
            return wrapped(**call)
        finally:
            leave_packed(token)

    heads = [child for child in instance.children() if child is not instance.base_model]
    out, outputs = captured_outputs(run, heads)
    num_labels = getattr(instance, "num_labels", None) or getattr(config, "num_labels", None)
    scores = per_token_scores(outputs, flat.shape, num_labels, instance)
    pooled = pool_sequences(scores, boundaries, input_ids=input_ids, attention_mask=mask, pad_token_id=pad_token_id)
    loss = None
    if labels is not None:
        from transformers.loss.loss_utils import ForSequenceClassificationLoss

        loss = ForSequenceClassificationLoss(labels, pooled, instance.config)
    return _with_outputs(out, pooled, loss, boundaries.shape if flat is not boundaries else None)


def _as_one_row(value: Any, shape: tuple[int, int]) -> Any:
    """A per-token (B, T, ...) tensor (or (k, B, T) rotary rows) as one row of B*T tokens."""
    batch, length = shape
    if not isinstance(value, torch.Tensor) or value.ndim < 2:
        return value
    if tuple(value.shape[:2]) == shape:
        return value.reshape(1, batch * length, *value.shape[2:])
    if value.ndim == 3 and tuple(value.shape[1:]) == shape:
        return value.reshape(value.shape[0], 1, batch * length)
    return value


def _with_outputs(out: Any, logits: torch.Tensor, loss: torch.Tensor | None, rows: tuple[int, int] | None) -> Any:
    """``out`` with the pooled logits and their loss (and per-token outputs back as ``rows``)."""

    def back(value: Any) -> Any:
        if rows is None:
            return value
        if isinstance(value, tuple):
            return tuple(back(v) for v in value)
        if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == 1:
            if value.shape[1] == rows[0] * rows[1]:
                return value.reshape(*rows, *value.shape[2:])
        return value

    if isinstance(out, tuple):  # return_dict=False: (logits, ...) as upstream had no labels
        rest = tuple(back(v) for v in out[1:])
        return ((loss,) if loss is not None else ()) + (logits,) + rest
    fields = {k: back(v) for k, v in out.items() if k not in ("loss", "logits")}
    return type(out)(loss=loss, logits=logits, **fields)


def accepts_var_kwargs(fn: Callable) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def accepts_argument(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes ``name`` (by name or through ``**kwargs``)."""
    return name in inspect.signature(fn).parameters or accepts_var_kwargs(fn)
