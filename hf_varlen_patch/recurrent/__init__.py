"""Boundary-aware recurrent ops (short convolutions, SSM scans, delta rules), chosen by name.

transformers 5.x computes every recurrent mixer through module-level functions of the model's
``modeling_*`` file (``causal_conv1d_fn``, ``mamba2_chunk_scan``, ``torch_chunk_gated_delta_rule``,
...), looked up at call time. :func:`route_recurrent_functions` puts a router in place of each one
that this table knows: in a packed forward (boundaries in the call's kwargs or in the running
forward's context) it runs the op below, which resets state at every sequence start through an
installed fused kernel that honours boundaries, else the exact torch path
(:mod:`.torch_ops`); otherwise it calls the upstream function untouched. A router is shared by
every patched model of that file (reference-counted) and removed when the last one is unapplied,
so unpatched models and unpacked calls run exactly upstream's code.

A router reads upstream's call through upstream's own signature (:func:`upstream_signature`):
positional, keyword and defaulted arguments alike, also through ``functools`` wrappers and the
``kernels`` package's function modules (transformers 5.25 turns these functions into
``nn.Module`` instances that a hub kernel can replace). What no signature can name raises
:class:`UnroutableCallError`. A hub kernel that replaces a function *around* a routed one (say
``causal_conv1d_forward``) or a whole mixer would bypass the router: :func:`guard_recurrent_layers`
refuses a packed forward through such a layer, and through any mixer whose packed forward
reached no router at all.
"""

from __future__ import annotations

import collections
import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..boundaries import Boundaries
from ..context import BOUNDARIES_KWARG, boundaries_for, enter_traced, leave_packed
from ..errors import RouterBypassedError, UnroutableCallError, VarlenPatchError
from . import kernels, torch_ops

__all__ = [
    "RECURRENT_OPS",
    "RouterBypassedError",
    "UnroutableCallError",
    "blocks_enter_their_boundaries",
    "guard_recurrent_layers",
    "upstream_signature",
    "route_recurrent_functions",
    "route_recurrent_attribute",
    "route_causal_conv",
    "run_sequences_as_rows",
    "routed_functions",
    "row_sequence_ids",
]

#: (boundaries, upstream function, its call as {parameter: value}, modeling module) -> result
RecurrentOp = Callable[[Boundaries, Callable, dict, types.ModuleType], Any]


def upstream_signature(fn: Callable, name: str) -> inspect.Signature:
    """The parameters of upstream's ``fn``: through ``__wrapped__`` (functools, transformers' hub
    fallback) and through the ``kernels`` package's function modules, whose ``forward`` carries
    the function's signature. A signature that names no parameter raises
    :class:`UnroutableCallError` naming ``name``."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError) as err:
        raise UnroutableCallError(
            f"hf_varlen_patch cannot read the signature of {name} ({fn!r}: {err}), so it cannot route its "
            "calls through the boundary-aware op; please report this transformers version."
        ) from err
    kinds = {p.kind for p in signature.parameters.values()}
    if inspect.Parameter.VAR_POSITIONAL in kinds or kinds <= {inspect.Parameter.VAR_KEYWORD}:
        raise UnroutableCallError(
            f"{name}{signature} hides its parameters behind *args/**kwargs (a wrapper without __wrapped__), "
            "so hf_varlen_patch cannot read its calls by name; please report this transformers version."
        )
    return signature


class _Call(dict):
    """An upstream call by parameter name; a name it lacks raises :class:`UnroutableCallError`."""

    def __init__(self, name: str, signature: inspect.Signature, arguments: dict) -> None:
        super().__init__(arguments)
        self.name, self.signature = name, signature

    def __missing__(self, key: str) -> Any:
        raise UnroutableCallError(
            f"{self.name}{self.signature} has no parameter {key!r}, which the boundary-aware op reads; "
            "this transformers version renamed it. Please report it (hf_varlen_patch.recurrent RECURRENT_OPS)."
        )


def bind_call(name: str, signature: inspect.Signature, args: tuple, kwargs: dict) -> _Call:
    """``args``/``kwargs`` of a call to ``name`` by parameter name, defaults filled in, the
    ``**kwargs`` catch-all merged in, kernel argument names (``x``, ``q``, ...) as transformers'."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise UnroutableCallError(f"a call to {name}{signature} does not bind to its signature: {err}") from err
    bound.apply_defaults()
    call: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        if signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        else:
            call[_ALIASES.get(key, key)] = value
    return _Call(name, signature, call)


def row_sequence_ids(boundaries: Boundaries, batch: int, length: int) -> torch.Tensor:
    """(batch, length) int32 sequence ids for a recurrent op's input.

    An input longer than the packed rows carries a cache prefix (the conv state of an empty cache):
    it counts as part of each row's first sequence.
    """
    rows, width = boundaries.shape
    if batch != rows or length < width:
        raise VarlenPatchError(
            f"a recurrent layer got a (batch={batch}, length={length}) input in a packed forward over "
            f"{rows} rows of {width} tokens; hf_varlen_patch cannot place the sequence boundaries there."
        )
    seq = boundaries.seq_idx_rows()
    if length > width:
        seq = torch.cat([seq[:, :1].expand(rows, length - width), seq], dim=1)
    return seq


def _activation(name: str | None) -> Callable | None:
    if name is None:
        return None
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _conv(boundaries: Boundaries, upstream: Callable, call: dict, module: types.ModuleType) -> torch.Tensor:
    x, weight, bias = call["hidden_states"], call["weight"], call.get("bias")
    seq = row_sequence_ids(boundaries, x.shape[0], x.shape[-1])
    fused = kernels.kernel("causal_conv1d", x, weight)
    if fused is not None and x.shape[1] % 8 == 0 and 2 <= weight.shape[-1] <= 4:
        if x.stride(1) != 1:  # the seq_idx kernel reads channel-last memory
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return fused(x, weight, bias, seq_idx=seq.to(torch.int32).contiguous(), activation=call.get("activation"))
    if x.shape[-1] == boundaries.shape[1] and call.get("activation") in (None, "silu", "swish"):
        triton_conv = kernels.kernel("fla_causal_conv1d", x, weight)
        if triton_conv is not None:
            return _conv_varlen(triton_conv, boundaries, x, weight, bias, call.get("activation"))
    return torch_ops.causal_conv1d(x, weight, bias, seq, _activation(call.get("activation")))


def _conv_varlen(fn: Callable, boundaries: Boundaries, x: torch.Tensor, weight, bias, activation) -> torch.Tensor:
    """flash-linear-attention's Triton short convolution with cu_seqlens: the (batch, dim, length)
    rows flattened to one (1, batch * length, dim) stream (its batch-1 rule) and back."""
    batch, dim, length = x.shape
    flat = x.transpose(1, 2).reshape(1, batch * length, dim)
    y, _ = fn(flat, weight, bias, activation=activation, cu_seqlens=boundaries.cu_seqlens_int64())
    return y.reshape(batch, length, dim).transpose(1, 2)


_SSD_ARGS = ("D", "dt_bias", "initial_states", "dt_softplus", "dt_limit", "return_final_states")


def _ssd(boundaries: Boundaries, upstream: Callable, call: dict, module: types.ModuleType):
    x = call["hidden_states"]
    seq = row_sequence_ids(boundaries, x.shape[0], x.shape[1])
    fused = kernels.kernel("ssd_chunk_scan", x)
    if fused is not None:
        kwargs = {k: call[k] for k in (*_SSD_ARGS, "z") if k in call}
        return kernels.call_with_supported(
            fused, x, call["dt"], call["A"], call["B"], call["C"], call["chunk_size"],
            seq_idx=seq.to(torch.int32).contiguous(), **kwargs,
        )  # fmt: skip
    if call.get("z") is not None:
        raise VarlenPatchError("the torch Mamba2 scan got a gate z, which the upstream reference ignores too.")
    kwargs = {k: call[k] for k in _SSD_ARGS if k in call}
    return torch_ops.chunked_ssd_scan(x, call["dt"], call["A"], call["B"], call["C"], call["chunk_size"], seq, **kwargs)


def _ssd_fused(boundaries: Boundaries, upstream: Callable, call: dict, module: types.ModuleType):
    """The all-in-one Mamba2 kernel, with seq_idx; without it None sends the mixer down its unfused
    path (convolution then scan), whose functions are routed too."""
    zxbcdt = call["zxbcdt"]
    fused = kernels.kernel("ssd_split_conv1d_scan", zxbcdt)
    if fused is None or kernels.kernel("causal_conv1d", zxbcdt) is None:
        return None
    seq = row_sequence_ids(boundaries, zxbcdt.shape[0], zxbcdt.shape[1])
    args = {k: v for k, v in call.items() if k != "zxbcdt"}
    return kernels.call_with_supported(fused, zxbcdt, seq_idx=seq.to(torch.int32).contiguous(), **args)


def _selective_scan(boundaries: Boundaries, upstream: Callable, call: dict, module: types.ModuleType):
    u = call["hidden_states"]
    seq = row_sequence_ids(boundaries, u.shape[0], u.shape[-1])
    return torch_ops.selective_scan(
        u, call["dt"], call["A"], call["B"], call["C"], seq,
        D=call.get("D"), z=call.get("z"), delta_bias=call.get("delta_bias"),
        delta_softplus=call.get("delta_softplus", False), return_last_state=call.get("return_last_state", False),
    )  # fmt: skip


def _no_fused_mamba1(boundaries: Boundaries, upstream: Callable, call: dict, module: types.ModuleType):
    """Mamba1's fused kernel takes no boundaries: None sends the mixer down its unfused path."""
    return None


def _delta_rule(kernel_name: str) -> RecurrentOp:
    def op(boundaries: Boundaries, upstream: Callable, call: dict, module: types.ModuleType):
        q, initial = call["query"], call.get("initial_state")
        batch, length = q.shape[:2]
        seq = row_sequence_ids(boundaries, batch, length)
        if length != boundaries.shape[1]:
            raise VarlenPatchError("a delta-rule layer got a cache prefix in a packed forward.")
        fused = kernels.kernel(kernel_name, q)
        if fused is not None:
            return _delta_rule_varlen(fused, boundaries, seq, call)
        normalize = getattr(module, "l2norm", torch_ops.l2_normalize)
        options = dict(
            chunk_size=call.get("chunk_size", 64),
            output_final_state=call.get("output_final_state", False),
            use_qk_l2norm_in_kernel=call.get("use_qk_l2norm_in_kernel", False),
            normalize=normalize,
        )
        tensors = [call[k] for k in ("query", "key", "value", "g", "beta")]
        if _one_row_per_sequence_is_shorter(boundaries):
            return _delta_rule_per_sequence_rows(boundaries, seq, tensors, initial, options)
        return torch_ops.chunked_delta_rule(*tensors, seq, initial_state=initial, **options)

    return op


def _one_row_per_sequence_is_shorter(boundaries: Boundaries) -> bool:
    """The chunk loop of the torch delta rule is sequential along a row: laying each sequence out
    as its own row shortens it (longest sequence instead of the packed row) at the cost of padding
    to the longest sequence; worth it unless that padding would more than quadruple the tokens."""
    rows, width = boundaries.shape
    return boundaries.max_seqlen < width and boundaries.num_sequences * boundaries.max_seqlen <= 4 * rows * width


def _delta_rule_per_sequence_rows(
    boundaries: Boundaries, seq: torch.Tensor, tensors: list[torch.Tensor], initial: torch.Tensor | None, options: dict
):
    """The exact torch delta rule with every sequence as its own row (gathered, one batched call,
    scattered back); each row's initial state goes to its first sequence, its final state comes
    from its last."""
    index, valid = boundaries.sequence_rows()
    batch, length = seq.shape

    firsts = seq[:, 0].to(torch.int64)
    if initial is not None:
        initial = initial.new_zeros(boundaries.num_sequences, *initial.shape[1:]).index_copy(0, firsts, initial)
    out, final = torch_ops.chunked_delta_rule(
        *(_flat_to_rows(t, index, valid) for t in tensors), torch.zeros_like(index), initial_state=initial, **options
    )
    if final is not None:
        final = final.index_select(0, seq[:, -1].to(torch.int64))
    return _rows_to_flat(out, index, valid, (batch, length)), final


def _delta_rule_varlen(fused: Callable, boundaries: Boundaries, seq: torch.Tensor, call: dict):
    """flash-linear-attention with cu_seqlens: the rows flattened to one (its batch-1 rule); one
    initial/final state per sequence, the rows' own at their first/last sequences."""
    batch, length = seq.shape
    flat = {k: call[k].reshape(1, batch * length, *call[k].shape[2:]) for k in ("query", "key", "value", "g", "beta")}
    initial = call.get("initial_state")
    if initial is not None:
        states = initial.new_zeros(boundaries.num_sequences, *initial.shape[1:])
        initial = states.index_copy(0, seq[:, 0].to(torch.int64), initial)
    out, final = kernels.call_with_supported(
        fused, flat["query"], flat["key"], flat["value"], flat["g"], flat["beta"],
        initial_state=initial, output_final_state=call.get("output_final_state", False),
        use_qk_l2norm_in_kernel=call.get("use_qk_l2norm_in_kernel", False),
        cu_seqlens=boundaries.cu_seqlens_int64(),
    )  # fmt: skip
    if final is not None:
        final = final.index_select(0, seq[:, -1].to(torch.int64))
    return out.reshape(batch, length, *out.shape[2:]), final


#: Sequence parallel: each op's per-token arguments -> their token axis, and its output's.
TOKEN_AXES: dict[str, tuple[dict[str, int], int]] = {
    "causal_conv1d_fn": ({"hidden_states": -1}, -1),
    "mamba2_chunk_scan": ({"hidden_states": 1, "dt": 1, "B": 1, "C": 1, "z": 1}, 1),
    "mamba2_split_conv1d_scan_combined": ({"zxbcdt": 1}, 1),
    "mamba_selective_scan": ({"hidden_states": -1, "dt": -1, "B": -1, "C": -1, "z": -1}, -1),
    "mamba_inner_fn": ({}, 1),
    "torch_chunk_gated_delta_rule": ({"query": 1, "key": 1, "value": 1, "g": 1, "beta": 1}, 1),
    "chunk_kimi_delta_attention": ({"query": 1, "key": 1, "value": 1, "g": 1, "beta": 1}, 1),
}


def _on_whole_stream(name: str, shard: Any, call: dict, op: Callable) -> Any:
    from ..errors import UnsupportedArchitectureError
    from ..sequence_parallel import on_whole_stream

    if name not in TOKEN_AXES:
        raise UnsupportedArchitectureError(f"the recurrent op {name} has no sequence-parallel path yet.")
    axes, out_axis = TOKEN_AXES[name]
    return on_whole_stream(op, shard, call, axes, out_axis)


#: upstream function name (as transformers 5.x names it in modeling files) -> boundary-aware op
RECURRENT_OPS: dict[str, RecurrentOp] = {
    "causal_conv1d_fn": _conv,
    "mamba2_chunk_scan": _ssd,
    "mamba2_split_conv1d_scan_combined": _ssd_fused,
    "mamba_selective_scan": _selective_scan,
    "mamba_inner_fn": _no_fused_mamba1,
    "torch_chunk_gated_delta_rule": _delta_rule("gated_delta_rule"),
    "chunk_kimi_delta_attention": _delta_rule("kda"),
}


@dataclass
class _Route:
    upstream: Callable
    router: Callable
    users: int = 0


_ROUTES: dict[tuple[str, str], _Route] = {}


#: The kernels' argument names (causal_conv1d, flash-linear-attention) -> transformers' torch ones.
_ALIASES = {"x": "hidden_states", "q": "query", "k": "key", "v": "value"}


#: Packed calls the routers served (eager only): :func:`guard_recurrent_layers` checks that a
#: mixer's packed forward moved it.
_ROUTER_CALLS = [0]


def _make_router(name: str, upstream: Callable, op: RecurrentOp, module: types.ModuleType) -> Callable:
    signature = upstream_signature(upstream, f"{module.__name__}.{name}")

    def router(*args, **kwargs):
        boundaries = boundaries_for(kwargs)
        kwargs.pop(BOUNDARIES_KWARG, None)
        if boundaries is None:
            return upstream(*args, **kwargs)
        if not torch.compiler.is_compiling():
            _ROUTER_CALLS[0] += 1
        call = bind_call(f"{module.__name__}.{name}", signature, args, kwargs)
        for given in ("seq_idx", "cu_seqlens", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            call.pop(given, None)  # the boundaries say it; the ops take them from there
        chosen = RECURRENT_OPS.get(name, op)
        shard = getattr(boundaries, "shard", None)
        if shard is not None:  # sequence parallel: the op runs on the whole stream
            return _on_whole_stream(name, shard, call, lambda whole, c: chosen(whole, upstream, c, module))
        return chosen(boundaries, upstream, call, module)

    router.__wrapped__ = upstream
    router.__name__ = getattr(upstream, "__name__", name)
    router.__qualname__ = getattr(upstream, "__qualname__", name)
    router.hf_varlen_route = name
    return router


def routed_functions(module: types.ModuleType) -> list[str]:
    """The names in ``module`` that :data:`RECURRENT_OPS` knows."""
    return [name for name in RECURRENT_OPS if callable(getattr(module, name, None))]


def route_recurrent_functions(patcher: Any, module: types.ModuleType) -> list[str]:
    """Route the recurrent functions of ``module`` (a ``modeling_*`` file) through the
    boundary-aware ops while this patch is applied; returns the names routed."""
    names = routed_functions(module)
    for name in names:
        key = (module.__name__, name)
        route = _ROUTES.get(key)
        if route is None:
            upstream = getattr(module, name)
            route = _ROUTES[key] = _Route(upstream, _make_router(name, upstream, RECURRENT_OPS[name], module))
            setattr(module, name, route.router)
        route.users += 1
        patcher.undo_log.append(_RouteUser(module, name))
    return names


class _RouteUser:
    """Undo record: one patched model's use of a routed function; the last user's undo restores
    upstream's."""

    def __init__(self, module: Any, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self) -> None:
        key = (self.module.__name__, self.name)
        route = _ROUTES[key]
        route.users -= 1
        if route.users == 0:
            setattr(self.module, self.name, route.upstream)
            del _ROUTES[key]


def route_recurrent_attribute(patcher: Any, layer: torch.nn.Module, attr: str, op_name: str) -> None:
    """Route the function a layer keeps as an instance attribute (transformers 4.x binds its
    kernels so, e.g. ``self.chunk_gated_delta_rule``) through the op ``op_name``."""
    upstream = getattr(layer, attr)
    module = sys.modules[type(layer).__module__]
    patcher.set_attr(layer, attr, _make_router(op_name, upstream, RECURRENT_OPS[op_name], module))


def route_causal_conv(patcher: Any, conv: torch.nn.Conv1d) -> None:
    """Make a causal depthwise ``nn.Conv1d`` (padding ``width - 1``, its caller keeps the first
    ``length`` outputs) drop the taps of the previous sequence in packed forwards."""
    width = conv.kernel_size[0]
    if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels or conv.padding != (width - 1,):
        raise VarlenPatchError(f"{conv} is not a causal depthwise convolution; it cannot be routed.")

    def forward(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        boundaries = boundaries_for()
        if boundaries is None:
            return wrapped(*args, **kwargs)
        (x,) = args

        def conv(whole: Boundaries, call: dict) -> torch.Tensor:
            x = call["hidden_states"]
            seq = row_sequence_ids(whole, x.shape[0], x.shape[-1])
            return torch_ops.causal_conv1d(x, instance.weight[:, 0], instance.bias, seq)

        shard = getattr(boundaries, "shard", None)
        if shard is not None:
            from ..sequence_parallel import on_whole_stream

            out = on_whole_stream(conv, shard, {"hidden_states": x}, {"hidden_states": -1}, -1)
        else:
            out = conv(boundaries, {"hidden_states": x})
        return torch.nn.functional.pad(out, (0, width - 1))  # the caller cuts these off, as upstream's

    patcher.wrap_method(conv, "forward", forward)


def _flat_to_rows(t: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(batch, length, ...) to (sequences, longest, ...): each sequence its own row, zero-padded."""
    rows = t.reshape(-1, *t.shape[2:])[index]
    return rows * valid.view(*valid.shape, *([1] * (rows.ndim - 2))).to(rows.dtype)


def _rows_to_flat(rows: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(sequences, longest, ...) back to (batch, length, ...), without a device sync: padding
    positions land on one spare slot that is dropped."""
    batch, length = shape
    target = torch.where(valid, index, batch * length).flatten()
    flat = rows.new_zeros(batch * length + 1, *rows.shape[2:]).index_put((target,), rows.flatten(0, 1))
    return flat[:-1].view(batch, length, *rows.shape[2:])


def run_sequences_as_rows(
    patcher: Any, layer: torch.nn.Module, *, scatter: tuple[int, ...] = (0,), passthrough: dict[int, str] | None = None
) -> None:
    """Run a causal sequence mixer that upstream computes inline (a token loop, a block-wise
    recurrence, stacked convolutions) with every packed sequence as its own row, in one batched call.

    In a packed forward, every (batch, length, ...) tensor argument is gathered into
    (sequences, longest, ...) rows (``Boundaries.sequence_rows``; each row ends in zero padding,
    which a causal mixer never lets reach real tokens); the attention mask, cache and state are
    dropped (``use_cache=False``). Outputs at positions ``scatter`` (of a tuple, or the tensor
    itself) go back to the packed layout; ``passthrough`` outputs (index -> argument name) hand
    that argument back as given (a state the caller threads on); the rest (the rows' final
    states) become None. Exact by construction, at the cost of padding to the longest sequence
    inside this layer; a packed forward leaves no
    recurrent state of this layer in the cache.
    """

    def forward(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        boundaries = boundaries_for(kwargs)
        if boundaries is None:
            return wrapped(*args, **kwargs)
        shape = boundaries.shape
        index, valid = boundaries.sequence_rows()
        what = f"{type(instance).__name__}.forward"
        signature = upstream_signature(wrapped, what)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as err:
            raise UnroutableCallError(f"a call to {what}{signature} does not bind to its signature: {err}") from err
        catch_all = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        extra = bound.arguments.get(catch_all, {})
        call = {**{k: v for k, v in bound.arguments.items() if k != catch_all}, **extra}
        first = next((v for v in call.values() if isinstance(v, torch.Tensor)), None)
        if first is None or tuple(first.shape[:2]) != shape:
            raise VarlenPatchError(
                f"{type(instance).__name__} got a {tuple(getattr(first, 'shape', ()))} input in a packed forward over "
                f"{shape[0]} rows of {shape[1]} tokens (a chunked or cached path); run packed rows in one call "
                "with use_cache=False."
            )
        given = dict(call)
        for name, value in call.items():
            if isinstance(value, torch.Tensor) and tuple(value.shape[:2]) == shape:
                call[name] = _flat_to_rows(value, index, valid)
            elif name in ("attention_mask", "cache", "past_key_values", "past_key_value", "layer_past", "state"):
                call[name] = None
            elif name == "use_cache":
                call[name] = False
        for key in bound.arguments:
            bound.arguments[key] = {k: call[k] for k in extra} if key == catch_all else call[key]
        out = wrapped(*bound.args, **bound.kwargs)
        if isinstance(out, torch.Tensor):
            return _rows_to_flat(out, index, valid, shape)
        keep = passthrough or {}
        return type(out)(
            _rows_to_flat(o, index, valid, shape) if i in scatter else given.get(keep[i]) if i in keep else None
            for i, o in enumerate(out)
        )

    patcher.wrap_method(layer, "forward", forward)


def _enter_own_keyword(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    entered = enter_traced(kwargs.get(BOUNDARIES_KWARG))
    try:
        return wrapped(*args, **kwargs)
    finally:
        if entered:
            leave_packed(None)


def blocks_enter_their_boundaries(patcher: Any, model: torch.nn.Module) -> list[str]:
    """Make each block of ``model`` (its ``_no_split_modules``: the unit of per-block compilation,
    FSDP wrapping and checkpointing) whose forward takes ``**kwargs`` make the boundaries it is
    handed as the engine's keyword current while it runs compiled on its own (``block.compile()``
    inside an eager packed forward): the routers, guards and inline mixers inside it, which get no
    keyword, then find them traced, as attention does, instead of reading the eager forward's
    context variable (a graph break at every routed call). Eager and whole-model compiled
    forwards run as before. Returns the blocks' class names."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = []
    for layer in model.modules():
        if type(layer).__name__ not in names:
            continue
        parameters = inspect.signature(layer.forward).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            patcher.wrap_method(layer, "forward", _enter_own_keyword)
            blocks.append(type(layer).__name__)
    return sorted(set(blocks))


# ------------------------------------------------------------------ guard against bypassed routers

#: mixer class -> the ``kernels`` function names (``_kernel_funcs`` keys) that compute around a
#: routed function: a hub kernel in their place skips the router.
_AROUND: dict[type, frozenset[str]] = {}
#: Router-call counts at the start of the mixers' packed forwards now running (innermost last);
#: None for a forward that runs compiled (its routers do not count).
_GUARD_STACK: list[int | None] = []


def _kernel_layer_name(fn: Any) -> str | None:
    """The hub layer name of a function the ``kernels`` package turned into a module (its
    ``_kernel_funcs`` key), else None."""
    return getattr(type(fn), "kernel_layer_name", None) if isinstance(fn, torch.nn.Module) else None


def _python_function(fn: Any) -> Callable | None:
    """The Python function a ``kernels`` function module runs when no hub kernel replaces it."""
    for cell in getattr(type(fn).forward, "__closure__", None) or ():
        inner = cell.cell_contents
        if inspect.isfunction(inner):
            return inspect.unwrap(inner)
    return None


def _reaches_routed(module: types.ModuleType, key: str, routed: set[str]) -> bool:
    """Whether the module function ``key`` (a hub layer name) calls a routed function; True when
    its body cannot be found (a hub kernel in its place is then refused, not trusted)."""
    for value in vars(module).values():
        if _kernel_layer_name(value) == key:
            body = _python_function(value)
            return body is None or bool(routed & set(body.__code__.co_names))
    return True


def _kernelized(obj: Any) -> Any:
    """The hub repository ``kernels.kernelize`` put in place of ``obj``'s forward, else None."""
    return getattr(obj, "_kernel_repo", None)


def _under_compile() -> bool:
    """Whether this code is traced, or runs eagerly inside a compiled forward (between its graphs,
    or in a frame past the recompile limit): the frames it calls may then run compiled code, whose
    routers do not count (a count read in traced code would be a guard on its value, a recompile
    per step). Dynamo's frame callback is None only outside torch.compile."""
    if torch.compiler.is_compiling():
        return True
    return getattr(torch._C._dynamo.eval_frame, "get_eval_frame_callback", lambda: None)() is not None


def _guard_before(layer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    if boundaries_for() is None:
        return
    replaced = []
    if _kernelized(layer) is not None:
        replaced.append(f"the whole layer ({_kernelized(layer)})")
    funcs = getattr(layer, "_kernel_funcs", {})
    for key in _AROUND.get(type(layer), ()):
        if key in funcs and _kernelized(funcs[key]) is not None:
            replaced.append(f"{key} ({_kernelized(funcs[key])})")
    if replaced:
        raise RouterBypassedError(
            f"{type(layer).__name__} runs hub kernels in place of {', '.join(replaced)}, which compute its "
            "convolution or scan without the packed sequence boundaries (state would flow from one sequence "
            "into the next). Run packed batches on a model that kernels.kernelize / use_kernels did not touch, "
            "or unpack."
        )
    if not torch.compiler.is_compiling():
        _GUARD_STACK.append(None if _under_compile() else _ROUTER_CALLS[0])


def _guard_after(layer: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    if boundaries_for() is None or torch.compiler.is_compiling() or not _GUARD_STACK:
        return
    start = _GUARD_STACK.pop()
    # output None: the forward raised, its error stands
    if start is not None and output is not None and _ROUTER_CALLS[0] == start:
        raise RouterBypassedError(
            f"the packed forward of {type(layer).__name__} reached none of the boundary-aware functions "
            f"({', '.join(sorted(_ROUTED_KEYS.get(type(layer), ())))}): something computed its convolution or scan "
            "without them, so sequences would leak into each other. Please report this transformers version."
        )


#: mixer class -> the ``_kernel_funcs`` keys of its routed functions (for messages).
_ROUTED_KEYS: dict[type, frozenset[str]] = {}


class _GuardUser:
    """Undo record: take the guard hooks off one mixer (a record, so patched models pickle)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.layer = layer

    def __call__(self) -> None:
        layer = self.layer
        for hooks, hook in ((layer._forward_pre_hooks, _guard_before), (layer._forward_hooks, _guard_after)):
            for key in [k for k, v in hooks.items() if v is hook]:
                del hooks[key]
                for extra in _HOOK_FLAGS:
                    getattr(layer, extra, {}).pop(key, None)


#: Where torch keeps the flags of a hook (by its id) besides the hook itself.
_HOOK_FLAGS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")

#: One hook id for the guard's pre-hook and one for its hook on every mixer, reserved from torch's
#: counter (so no other hook has them): a block compiled alone (``block.compile()``) is guarded
#: on its mixer's hook ids, and ids that differ per layer recompiled it for every layer (bamba with
#: six layers reached dynamo's limit of 8 compiles, and ran eagerly after it).
_GUARD_IDS = tuple(torch.utils.hooks.RemovableHandle(collections.OrderedDict()).id for _ in range(2))


def _add_guard_hooks(layer: torch.nn.Module) -> None:
    """``register_forward_pre_hook(_guard_before, with_kwargs=True)`` and
    ``register_forward_hook(_guard_after, with_kwargs=True, always_call=True)``, under the shared ids."""
    before, after = _GUARD_IDS
    layer._forward_pre_hooks[before] = _guard_before
    layer._forward_pre_hooks_with_kwargs[before] = True
    layer._forward_hooks[after] = _guard_after
    layer._forward_hooks_with_kwargs[after] = True
    layer._forward_hooks_always_called[after] = True


def guard_recurrent_layers(patcher: Any, model: torch.nn.Module) -> list[str]:
    """Make every recurrent mixer of ``model`` that lists a routed function among its ``kernels``
    functions (transformers 5.25+) refuse a packed forward the router cannot see: a hub kernel in
    place of the mixer or of a function that calls a routed one (checked before the forward, also
    when compiled), or an eager packed forward that reached no router at all (checked after it).
    Call after :func:`route_recurrent_functions`; returns the guarded mixers' class names."""
    guarded = []
    for layer in model.modules():
        funcs = vars(layer).get("_kernel_funcs")
        if not funcs:
            continue
        module = sys.modules[type(layer).__module__]
        names = {n for (m, n) in _ROUTES if m == module.__name__}
        routed_keys = {_kernel_layer_name(_ROUTES[(module.__name__, n)].upstream) for n in names} - {None}
        if not routed_keys & set(funcs):
            continue
        _ROUTED_KEYS[type(layer)] = frozenset(routed_keys & set(funcs))
        _AROUND[type(layer)] = frozenset(k for k in funcs if k not in routed_keys and _reaches_routed(module, k, names))
        _add_guard_hooks(layer)
        patcher.undo_log.append(_GuardUser(layer))
        guarded.append(type(layer).__name__)
    return guarded
