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
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import BOUNDARIES_KWARG
from ..boundaries import Boundaries
from ..errors import VarlenPatchError
from . import kernels, torch_ops

__all__ = [
    "RECURRENT_OPS",
    "route_recurrent_functions",
    "route_recurrent_attribute",
    "route_causal_conv",
    "run_sequences_as_rows",
    "routed_functions",
    "row_sequence_ids",
]

#: (boundaries, upstream function, its call as {parameter: value}, modeling module) -> result
RecurrentOp = Callable[[Boundaries, Callable, dict, types.ModuleType], Any]


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
    return torch_ops.causal_conv1d(x, weight, bias, seq, _activation(call.get("activation")))


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
        cu_seqlens=boundaries.cu_seqlens.to(torch.int64),
    )  # fmt: skip
    if final is not None:
        final = final.index_select(0, seq[:, -1].to(torch.int64))
    return out.reshape(batch, length, *out.shape[2:]), final


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


def _make_router(name: str, upstream: Callable, op: RecurrentOp, module: types.ModuleType) -> Callable:
    from ..patching import current_boundaries

    signature = inspect.signature(inspect.unwrap(upstream))

    def router(*args, **kwargs):
        boundaries = kwargs.pop(BOUNDARIES_KWARG, None) or current_boundaries()
        if boundaries is None:
            return upstream(*args, **kwargs)
        bound = signature.bind_partial(*args, **kwargs)
        call = {_ALIASES.get(k, k): v for k, v in bound.arguments.items() if k != "kwargs"}
        call.update(bound.arguments.get("kwargs", {}))
        for given in ("seq_idx", "cu_seqlens", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            call.pop(given, None)  # the boundaries say it; the ops take them from there
        return RECURRENT_OPS.get(name, op)(boundaries, upstream, call, module)

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
    from ..patching import current_boundaries

    width = conv.kernel_size[0]
    if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels or conv.padding != (width - 1,):
        raise VarlenPatchError(f"{conv} is not a causal depthwise convolution; it cannot be routed.")

    def forward(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        boundaries = current_boundaries()
        if boundaries is None:
            return wrapped(*args, **kwargs)
        (x,) = args
        seq = row_sequence_ids(boundaries, x.shape[0], x.shape[-1])
        out = torch_ops.causal_conv1d(x, instance.weight[:, 0], instance.bias, seq)
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
    from ..patching import call_as_kwargs, current_boundaries

    def forward(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        boundaries = kwargs.get(BOUNDARIES_KWARG) or current_boundaries()
        if boundaries is None:
            return wrapped(*args, **kwargs)
        shape = boundaries.shape
        index, valid = boundaries.sequence_rows()
        call = call_as_kwargs(wrapped, args, kwargs)
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
        out = wrapped(**call)
        if isinstance(out, torch.Tensor):
            return _rows_to_flat(out, index, valid, shape)
        keep = passthrough or {}
        return type(out)(
            _rows_to_flat(o, index, valid, shape) if i in scatter else given.get(keep[i]) if i in keep else None
            for i, o in enumerate(out)
        )

    patcher.wrap_method(layer, "forward", forward)
