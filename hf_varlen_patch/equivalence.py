"""Packed-vs-separate equivalence: packed batches, the runs that compare them, tiny twin models.

``compare_packed(model, batch)`` runs every sequence of a packed batch alone, then the packed
batch, and returns the largest differences in logits, loss and parameter gradients;
:func:`worst_over_layouts` takes the worst over :data:`LAYOUTS` and both cache settings.

A leaf: it knows nothing of patch state or the registry, so the runtime (the self-check) can use
it without the test harness. What depends on them is passed in: whether the model shifts its
labels (``shifts_labels``) and whether its forward takes ``position_ids``.
:mod:`hf_varlen_patch.testing` fills both in from the model for users.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .samples import inputs_on_model

__all__ = [
    "LAYOUTS",
    "CACHE_SETTINGS",
    "PackedBatch",
    "make_packed_batch",
    "Run",
    "Comparison",
    "Worst",
    "worst_error",
    "run_separate",
    "run_packed",
    "compare_packed",
    "compare_multimodal",
    "worst_over_layouts",
    "max_logits_error",
    "max_grad_error",
    "relative_errors",
    "long_memory",
    "build_twin",
    "float32_twin",
    "packed_layouts",
]

#: The packed layouts of every check (self-check, ``scan``, ``check``, ``assert_packing_equivalent``):
#: one row of three sequences; two rows, one ending in padding (``attention_mask == 0``).
LAYOUTS = (
    dict(rows=[[5, 9, 3]]),
    dict(rows=[[5, 9, 3, 11], [12, 7]], extra_padding=3, seed=1),
)
#: ``use_cache`` of the packed runs: the model's default, then none (upstream differs between them).
CACHE_SETTINGS = (None, False)


# ---------------------------------------------------------------- tiny twin models

#: Parameters that set how fast a recurrent layer forgets: log(-A) and the step-size biases.
_DECAY_LOGS = ("A_log",)
_STEP_BIASES = ("dt_bias", "dt_proj_bias", "dt_proj.bias")


def long_memory(model: torch.nn.Module, *, decay: float = 0.02, step: float = 0.5) -> torch.nn.Module:
    """Give ``model``'s recurrent layers a state that survives hundreds of tokens: -A = ``decay``
    and softplus(step bias) = ``step``, so a token keeps about exp(-decay * step) of the state.

    Random initialisation can forget within a few tokens, which hides a state leak across packed
    sequences below any tolerance; checks of recurrent layers should run on these weights.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(_DECAY_LOGS):
                param.fill_(math.log(decay))
            elif name.endswith(_STEP_BIASES):
                param.fill_(math.log(math.expm1(step)))
    return model


def build_twin(
    config: Any,
    *,
    model_class: type | None = None,
    seed: int | None = 0,
    attn_implementation: str | None = None,
    long_lived: bool = True,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """A randomly initialised model of ``config`` (a tiny twin), the same for the same ``seed``
    (None: the global generator as it stands, for a model built only to see its classes).

    ``model_class``: a model class or an Auto class (default ``AutoModelForCausalLM``). With
    ``long_lived`` the recurrent layers get :func:`long_memory` weights in the dtype the model
    is built in, before the move to ``device`` / ``dtype`` (None: where and as it was built).
    """
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM if model_class is None else model_class
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if seed is not None:
        torch.manual_seed(seed)
    # a model class builds through _from_config (no Auto dispatch); an Auto class has only from_config
    model = cls._from_config(config, **kwargs) if hasattr(cls, "_from_config") else cls.from_config(config, **kwargs)
    if long_lived:
        model = long_memory(model)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def float32_twin(config: Any, *, model_class: type | None = None) -> torch.nn.Module:
    """:func:`build_twin` (seed 0) cast to float32 before :func:`long_memory`, so the decay
    weights are exact float32 values whatever dtype the config asks for."""
    return long_memory(build_twin(config, model_class=model_class, long_lived=False).float())


# ---------------------------------------------------------------- packed batches


@dataclass
class PackedBatch:
    """Sequences packed into rows, plus where each one sits.

    ``spans[i] = (row, start, length)`` locates sequence ``i``; padding is trailing, has
    ``attention_mask == 0`` and label -100.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor
    spans: list[tuple[int, int, int]]
    sequences: list[torch.Tensor] = field(repr=False)

    def shifted_labels(self) -> torch.Tensor:
        """Labels for models that do not shift inside their loss (``labels[t]`` targets
        ``logits[t]``): every sequence shifted on its own, its last token -100."""
        labels = torch.full_like(self.input_ids, -100)
        for (row, start, n), seq in zip(self.spans, self.sequences):
            labels[row, start : start + n - 1] = seq[1:].to(labels.device)
        return labels

    def to(self, device: str | torch.device) -> PackedBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedBatch(
            move(self.input_ids),
            move(self.position_ids),
            move(self.attention_mask),
            move(self.labels),
            self.spans,
            [s.to(device) for s in self.sequences],
        )


def make_packed_batch(
    rows: Sequence[Sequence[int]],
    vocab_size: int,
    *,
    extra_padding: int = 0,
    padding_positions: str = "zeros",
    all_ones_mask: bool = False,
    seed: int = 0,
) -> PackedBatch:
    """Pack random sequences of the given lengths, one list of lengths per row.

    Rows shorter than the longest (plus ``extra_padding``) get trailing padding, an
    attention_mask and label -100; ``padding_positions`` is "zeros" (0, 0, ...) or "continue"
    (the positions of the last sequence keep counting). Without padding, ``all_ones_mask``
    passes an all-ones mask instead of none.
    """
    gen = torch.Generator().manual_seed(seed)
    width = max(sum(r) for r in rows) + extra_padding
    batch = len(rows)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    position_ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    spans, sequences = [], []
    for r, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            seq = torch.randint(1, vocab_size, (n,), generator=gen)
            input_ids[r, start : start + n] = seq
            position_ids[r, start : start + n] = torch.arange(n)
            mask[r, start : start + n] = 1
            spans.append((r, start, n))
            sequences.append(seq)
            start += n
        if start < width and padding_positions == "continue" and lengths:
            position_ids[r, start:] = torch.arange(lengths[-1], lengths[-1] + width - start)
    labels = input_ids.masked_fill(mask == 0, -100)
    padded = bool((mask == 0).any())
    attention_mask = mask if padded or all_ones_mask else None
    return PackedBatch(input_ids, position_ids, attention_mask, labels, spans, sequences)


# ---------------------------------------------------------------- runs and comparisons


def worst_error(errors: Iterable[float]) -> float:
    """``max`` that propagates NaN (Python's ``max`` keeps whichever comes first)."""
    errors = list(errors)
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


@dataclass
class Comparison:
    """Largest absolute differences between the packed run and the separate runs."""

    logits: float
    loss: float
    model_loss: float
    grads: float
    worst_grad: str = ""

    @property
    def max_error(self) -> float:
        """The largest difference; NaN if any is NaN (a NaN gradient is never hidden by ``max``)."""
        return worst_error((self.logits, self.loss, self.model_loss, self.grads))

    def ok(self, tol: float) -> bool:
        return all(math.isfinite(x) for x in (self.logits, self.loss, self.model_loss, self.grads)) and (
            self.max_error <= tol
        )


def _token_loss_sum(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy within one sequence (in float32)."""
    if tokens.numel() < 2:
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:-1].float(), tokens[1:], reduction="sum")


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


@dataclass
class Run:
    """What one way of running a batch produced: per-sequence logits (float32), the mean
    next-token loss, the model's own loss for the batch's labels, and parameter gradients."""

    logits: list[torch.Tensor]
    loss: float
    model_loss: float | None
    grads: dict[str, torch.Tensor]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _own_labels(seq: torch.Tensor, shifts: bool) -> torch.Tensor:
    if shifts:
        return seq[None]
    return torch.cat([seq[1:], seq.new_full((1,), -100)])[None]


def run_separate(model: torch.nn.Module, batch: PackedBatch, *, grads: bool = True, shifts_labels: bool = True) -> Run:
    """Each sequence of ``batch`` alone (no cache), as the ground truth. ``shifts_labels``: the
    model shifts ``labels`` inside its loss (False: ``labels[t]`` is the target of ``logits[t]``)."""
    batch = batch.to(_model_device(model))
    calls = [({"input_ids": s[None]}, s, _own_labels(s, shifts_labels)) for s in batch.sequences]
    return _run_alone(model, calls, grads=grads)


def _run_alone(model: torch.nn.Module, calls: list[tuple[dict, torch.Tensor, torch.Tensor]], *, grads: bool) -> Run:
    """Every ``(inputs, tokens, labels)`` as its own forward (no cache): the mean next-token loss over
    all of them, and the model's own loss for ``labels`` weighted by each one's targets."""
    denom = max(sum(max(tokens.numel() - 1, 0) for _, tokens, _ in calls), 1)
    model.zero_grad(set_to_none=True)
    logits_out, loss_sum, model_loss = [], 0.0, 0.0
    for inputs, tokens, labels in calls:
        with torch.set_grad_enabled(grads):
            logits = model(**inputs, use_cache=False).logits[0]
            loss = _token_loss_sum(logits, tokens) / denom
            if grads:
                loss.backward()
        logits_out.append(logits.detach().float())
        loss_sum += float(loss.detach())
        if tokens.numel() > 1:
            with torch.no_grad():
                own = model(**inputs, labels=labels, use_cache=False).loss
            model_loss += float(own) * (tokens.numel() - 1) / denom
    return Run(logits_out, loss_sum, model_loss, _grads(model) if grads else {})


def run_packed(
    model: torch.nn.Module,
    batch: PackedBatch,
    *,
    grads: bool = True,
    use_cache: bool | None = False,
    shifts_labels: bool = True,
    takes_position_ids: bool = True,
) -> Run:
    """``batch`` packed, as a user would run it (``use_cache=None`` keeps the model's default).
    ``takes_position_ids=False`` leaves them out, for an unpatched model that numbers its tokens
    itself (4.57 BartForCausalLM); ``shifts_labels`` as in :func:`run_separate`."""
    batch = batch.to(_model_device(model))
    extra = {} if use_cache is None else {"use_cache": use_cache}
    inputs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
    if not takes_position_ids:
        del inputs["position_ids"]
    denom = max(sum(max(n - 1, 0) for _, _, n in batch.spans), 1)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        out = model(**inputs, **extra)
        pieces = [out.logits[r, s : s + n] for r, s, n in batch.spans]
        loss = sum(_token_loss_sum(p, seq) for p, seq in zip(pieces, batch.sequences)) / denom
        if grads:
            loss.backward()
    model_loss = None
    if any(n > 1 for _, _, n in batch.spans):
        with torch.no_grad():
            labels = batch.labels if shifts_labels else batch.shifted_labels()
            model_loss = float(model(**inputs, labels=labels, **extra).loss)
    return Run([p.detach().float() for p in pieces], float(loss.detach()), model_loss, _grads(model) if grads else {})


def max_logits_error(a: Run, b: Run) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits))


def max_grad_error(a: Run, b: Run) -> tuple[float, str]:
    """Largest gradient difference and the parameter it is in. A parameter that one run leaves
    without a gradient counts as a zero gradient there (an MoE expert that only padding tokens
    reached gets an exactly zero gradient in the packed run and none in the separate runs)."""
    worst, name = 0.0, ""
    for key in sorted(set(a.grads) | set(b.grads)):
        ga, gb = a.grads.get(key), b.grads.get(key)
        ga = torch.zeros_like(gb) if ga is None else ga
        gb = torch.zeros_like(ga) if gb is None else gb
        err = float((ga - gb).abs().max())
        if err > worst or not math.isfinite(err):
            worst, name = err, key
    return worst, name


def relative_errors(a: Run, b: Run) -> tuple[float, float]:
    """(logits, gradients) differences relative to ``b``: ||a - b|| / ||b|| over all logits, and
    over all parameter gradients taken as one vector. Unlike max-abs errors these do not jump by
    whole bf16 ulps, and a near-zero gradient tensor (an unused embedding row, a router) cannot
    dominate them."""
    la, lb = torch.cat([x.flatten() for x in a.logits]), torch.cat([x.flatten() for x in b.logits])
    logits = float((la - lb).norm() / lb.norm().clamp_min(1e-12))
    keys = sorted(set(a.grads) | set(b.grads))
    if not keys:
        return logits, 0.0

    def grad(run: Run, key: str) -> torch.Tensor:  # a missing gradient is a zero one (see max_grad_error)
        other = a.grads.get(key, b.grads.get(key))
        return run.grads.get(key, torch.zeros_like(other)).flatten()

    diff = torch.cat([grad(a, k) - grad(b, k) for k in keys])
    ref = torch.cat([grad(b, k) for k in keys])
    return logits, float(diff.norm() / ref.norm().clamp_min(1e-12))


def _compare(
    model: torch.nn.Module, train: bool, grads: bool, separate: Callable[[], Run], packed: Callable[[], Run]
) -> Comparison:
    """The separate runs, then the packed one, in ``train`` mode; their largest differences."""
    was_training = model.training
    model.train(train)
    try:
        alone, together = separate(), packed()
        grad_err, worst = max_grad_error(together, alone) if grads else (0.0, "")
        model_loss_err = 0.0 if together.model_loss is None else abs(together.model_loss - alone.model_loss)
        return Comparison(
            logits=max_logits_error(together, alone),
            loss=abs(together.loss - alone.loss),
            model_loss=model_loss_err,
            grads=grad_err,
            worst_grad=worst,
        )
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def compare_packed(
    model: torch.nn.Module,
    batch: PackedBatch,
    *,
    grads: bool = True,
    use_cache: bool | None = False,
    train: bool = True,
    shifts_labels: bool = True,
    takes_position_ids: bool = True,
) -> Comparison:
    """Run each sequence alone and the packed batch; return the largest differences.

    The loss is the mean next-token cross-entropy over all sequences (no term crosses a
    boundary); gradients are of that loss. ``use_cache=None`` leaves the model's default.
    ``model_loss`` compares the model's own ``loss`` for ``labels=batch.labels`` with the
    token-weighted mean of the separate runs' losses. ``shifts_labels`` and
    ``takes_position_ids``: see :func:`run_packed`.
    """
    return _compare(
        model,
        train,
        grads,
        lambda: run_separate(model, batch, grads=grads, shifts_labels=shifts_labels),
        lambda: run_packed(
            model,
            batch,
            grads=grads,
            use_cache=use_cache,
            shifts_labels=shifts_labels,
            takes_position_ids=takes_position_ids,
        ),
    )


# ---------------------------------------------------------------- multimodal samples


def _run_samples(model: torch.nn.Module, samples: Sequence[dict], *, grads: bool) -> Run:
    on_model = [inputs_on_model(model, sample) for sample in samples]
    return _run_alone(model, [(s, s["input_ids"][0], s["input_ids"]) for s in on_model], grads=grads)


def _run_multimodal_packed(
    model: torch.nn.Module, samples: Sequence[dict], *, grads: bool, layout: str, use_cache: bool | None
) -> Run:
    from .packing import pack_multimodal

    batch = pack_multimodal(samples, flash_attn_kwargs=layout == "cu")
    if layout == "cu":
        del batch["position_ids"]
    batch = inputs_on_model(model, batch)
    labels = batch.pop("labels")
    if use_cache is not None:
        batch["use_cache"] = use_cache
    lengths = [s["input_ids"].shape[1] for s in samples]
    return _run_samples_together(model, batch, labels, lengths, grads, lambda t: list(t[0].split(lengths)))


def _run_samples_together(
    model: torch.nn.Module,
    batch: dict,
    labels: torch.Tensor,
    lengths: list[int],
    grads: bool,
    per_sample: Callable[[torch.Tensor], list[torch.Tensor]],
) -> Run:
    """One forward over ``batch``: the samples' logits (``per_sample`` splits a (rows, T, ...)
    tensor into each sample's tokens), their summed token loss over the real targets, its
    gradients, and the model's own loss with ``labels``."""
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        pieces = per_sample(model(**batch).logits)
        ids = per_sample(batch["input_ids"])
        loss = sum(_token_loss_sum(p, t) for p, t in zip(pieces, ids)) / max(sum(n - 1 for n in lengths), 1)
        if grads:
            loss.backward()
    with torch.no_grad():
        model_loss = float(model(**batch, labels=labels).loss)
    return Run([p.detach().float() for p in pieces], float(loss.detach()), model_loss, _grads(model) if grads else {})


def _pad_id(model: torch.nn.Module) -> int:
    """A text token to pad with: the smallest id that is no special (image, video, ...) token."""
    special = {v for k, v in model.config.to_dict().items() if k.endswith(("token_id", "token_index"))}
    return next(i for i in range(1, 1 << 20) if i not in special)


def _run_multimodal_padded(model: torch.nn.Module, samples: Sequence[dict], *, grads: bool, side: str) -> Run:
    """One sample per row, padded on ``side`` (two extra pads on the longest), with an
    ``attention_mask`` and no positions: what a padded collator gives ``unpad=True``."""
    from .packing import pack_multimodal

    batch = pack_multimodal(samples, flash_attn_kwargs=False)
    del batch["position_ids"]
    lengths = [s["input_ids"].shape[1] for s in samples]
    width = max(lengths) + 2
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        (mask[row, width - n :] if side == "left" else mask[row, :n]).fill_(1)
    real = mask.bool()
    pads = {"input_ids": _pad_id(model), "labels": -100}
    for key, value in list(batch.items()):
        if isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape == (1, sum(lengths)):
            padded = value.new_full((len(samples), width), pads.get(key, 0))
            padded[real] = value[0]
            batch[key] = padded
    batch["attention_mask"] = mask
    batch = inputs_on_model(model, batch)
    labels = batch.pop("labels")
    batch["use_cache"] = False

    def per_sample(t: torch.Tensor) -> list[torch.Tensor]:
        on = real.to(t.device)
        return [t[row][on[row]] for row in range(len(samples))]

    return _run_samples_together(model, batch, labels, lengths, grads, per_sample)


#: How :func:`compare_multimodal` hands the boundaries over: restarting positions, or cu seq lens.
MULTIMODAL_BOUNDARIES = ("positions", "cu")
#: ... or one sample per row, padded on the right or the left (for ``apply(model, unpad=True)``).
MULTIMODAL_PADDED = ("right", "left")


def compare_multimodal(
    model: torch.nn.Module,
    samples: Sequence[dict],
    *,
    grads: bool = True,
    layout: str = "positions",
    use_cache: bool | None = False,
    train: bool = True,
) -> Comparison:
    """Run each multimodal sample alone and all of them packed in one row
    (:func:`~hf_varlen_patch.packing.pack_multimodal`, boundaries from ``layout``: restarting
    ``"positions"`` or ``"cu"`` seq lens; ``use_cache=None`` keeps the model's default for the
    packed run), or with ``layout="right"``/``"left"`` one per row of a padded batch (what
    ``apply(model, unpad=True)`` runs packed); return the largest differences (logits, losses
    and every gradient, the vision tower's included)."""
    if layout in MULTIMODAL_PADDED:
        together = lambda: _run_multimodal_padded(model, samples, grads=grads, side=layout)  # noqa: E731
    elif layout in MULTIMODAL_BOUNDARIES:
        together = lambda: _run_multimodal_packed(  # noqa: E731
            model, samples, grads=grads, layout=layout, use_cache=use_cache
        )
    else:
        raise ValueError(f"layout must be one of {MULTIMODAL_BOUNDARIES + MULTIMODAL_PADDED}, not {layout!r}")
    return _compare(model, train, grads, lambda: _run_samples(model, samples, grads=grads), together)


# ---------------------------------------------------------------- the worst over layouts


@dataclass
class Worst:
    """The worst :class:`Comparison` of :func:`worst_over_layouts`, with the layout and
    ``use_cache`` that gave it."""

    comparison: Comparison
    layout: Any
    use_cache: bool | None

    @property
    def max_error(self) -> float:
        return self.comparison.max_error


def _worse(a: Worst, b: Worst) -> bool:
    """Whether ``a`` is worse than ``b``: a NaN error is worse than any number (first NaN kept)."""
    if math.isnan(b.max_error):
        return False
    return math.isnan(a.max_error) or a.max_error > b.max_error


def worst_over_layouts(
    model: torch.nn.Module,
    layouts: Iterable[Any] = LAYOUTS,
    *,
    grads: bool = True,
    shifts_labels: bool = True,
    takes_position_ids: bool = True,
    vocab_size: int | None = None,
    compare: Callable[[torch.nn.Module, Any, bool | None], Comparison] | None = None,
    stop_above: float | None = None,
) -> Worst:
    """The worst comparison over ``layouts`` x :data:`CACHE_SETTINGS`, layouts in order.

    ``compare(model, layout, use_cache)`` makes one comparison; default :func:`compare_packed`
    of ``make_packed_batch(vocab_size=..., **layout)`` (``vocab_size`` default: the text config's).
    ``stop_above``: return the first comparison that is not ``ok(stop_above)`` at once.
    """
    if compare is None:
        vocab = vocab_size or model.config.get_text_config().vocab_size

        def compare(model: torch.nn.Module, layout: dict, use_cache: bool | None) -> Comparison:
            return compare_packed(
                model,
                make_packed_batch(vocab_size=vocab, **layout),
                grads=grads,
                use_cache=use_cache,
                shifts_labels=shifts_labels,
                takes_position_ids=takes_position_ids,
            )

    worst: Worst | None = None
    for layout in layouts:
        for use_cache in CACHE_SETTINGS:
            result = Worst(compare(model, layout, use_cache), layout, use_cache)
            if stop_above is not None and not result.comparison.ok(stop_above):
                return result
            if worst is None or _worse(result, worst):
                worst = result
    if worst is None:
        raise ValueError("no layouts to compare")
    return worst


# ---------------------------------------------------------------- hypothesis strategies


def packed_layouts(max_rows: int = 3, max_sequences: int = 8, max_length: int = 64, max_extra_padding: int = 8):
    """Hypothesis strategy: kwargs for :func:`make_packed_batch` (rows of lengths, padding, seed).

    1..max_rows rows, each of 1..max_sequences sequences of 1..max_length tokens; optional
    trailing padding (positions zero or continuing), optional all-ones mask.
    """
    from hypothesis import strategies as st

    lengths = st.integers(min_value=1, max_value=max_length)
    row = st.lists(lengths, min_size=1, max_size=max_sequences)
    return st.fixed_dictionaries(
        {
            "rows": st.lists(row, min_size=1, max_size=max_rows),
            "extra_padding": st.one_of(st.just(0), st.integers(min_value=1, max_value=max_extra_padding)),
            "padding_positions": st.sampled_from(["zeros", "continue"]),
            "all_ones_mask": st.booleans(),
            "seed": st.integers(min_value=0, max_value=2**16),
        }
    )
