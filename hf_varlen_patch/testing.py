"""The equivalence harness (public API): tiny models, packed batches, packed-vs-separate checks.

``compare_packed(model, batch)`` runs every sequence of a packed batch alone, then the packed
batch, and returns the largest differences in logits, loss and parameter gradients. The
hypothesis strategies draw packed layouts for property tests.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .registry import lookup
from .twins import TwinError, tiny_config

__all__ = [
    "tiny_config",
    "PackedBatch",
    "Comparison",
    "tiny_model",
    "test_variants",
    "registered_variants",
    "make_packed_batch",
    "compare_packed",
    "run_separate",
    "run_packed",
    "relative_errors",
    "model_shifts_labels",
    "Run",
    "packed_layouts",
    "long_memory",
    "multimodal_layouts",
    "multimodal_samples",
    "compare_multimodal",
    "inputs_on_model",
]


def test_variants(model_type: str) -> dict[str, Any]:
    """{variant name: tiny config} that the registry entry declares for ``model_type``."""
    return lookup(model_type).variants(model_type)


test_variants.__test__ = False  # not a pytest test despite the name


def registered_variants(*, refused: bool = False, multimodal: bool = False) -> list[tuple[str, str]]:
    """(model_type, variant) for every test config of every registry entry whose model_type the
    installed transformers has; with ``refused=True`` the ones the entry refuses instead. Text
    models by default (batches of token ids); ``multimodal=True``: the vision-language entries'
    types instead (samples with images: :func:`multimodal_samples`)."""
    from transformers import CONFIG_MAPPING

    from .registry import supported_model_types

    out = []
    for mt in supported_model_types():
        if mt not in CONFIG_MAPPING:
            continue  # a model_type of another transformers release
        entry = lookup(mt)
        if (entry.multimodal is not None) != multimodal:
            continue
        try:
            variants = test_variants(mt)
        except TwinError:
            # no twin on this release: only acceptable where the entry refuses the type here anyway
            if entry.refusal(CONFIG_MAPPING[mt]()):
                continue
            raise
        for variant, config in variants.items():
            reason = entry.refusal(config)
            if bool(reason) == refused:
                out.append((mt, variant))
    return out


def auto_class(model_type: str) -> type:
    """The Auto class that builds ``model_type``'s models for tests: image-text-to-text for a
    vision-language entry (vision tower included), else causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if lookup(model_type).multimodal is not None else AutoModelForCausalLM


def tiny_model(
    model_type: str,
    variant: str | None = None,
    *,
    seed: int = 0,
    attn_implementation: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    min_head_dim: int | None = None,
) -> torch.nn.Module:
    """A tiny, randomly initialised causal LM (or vision-language model) of ``model_type`` (one of
    its test variants), in ``dtype`` (default: the entry's ``test_dtype``, float32 for almost all). Recurrent layers get
    :func:`long_memory` weights, so a state leak across packed sequences cannot hide.

    ``min_head_dim`` widens the twin until its attention heads are at least that wide (hidden
    sizes and explicit head dims scaled alike), for kernels that refuse narrow heads (FA4 trains
    none below 32); where that cannot be done (head dims of their own, as in MLA, or sizes tied
    to the head dim) the twin comes as it is."""
    variants = test_variants(model_type)
    config = variants[variant] if variant is not None else next(iter(variants.values()))
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    wide = _widened_config(config, min_head_dim) if min_head_dim else None
    model = None
    if wide is not None:
        try:  # built and run once on the host first: a device fault would poison the process
            torch.manual_seed(seed)
            model = long_memory(auto_class(model_type).from_config(wide, **kwargs))
            with torch.no_grad():
                model(input_ids=torch.ones(1, 8, dtype=torch.long), use_cache=False)
        except Exception:
            model = None
    if model is None:
        torch.manual_seed(seed)
        model = long_memory(auto_class(model_type).from_config(config, **kwargs))
    return model.to(device=device, dtype=dtype or lookup(model_type).test_dtype)


def _widened_config(config: Any, min_head_dim: int) -> Any | None:
    """A copy of ``config`` whose attention heads are at least ``min_head_dim`` wide, or None
    where widening the hidden size would not reach the heads."""
    from .patching import nested_configs

    config = copy.deepcopy(config)
    for sub in nested_configs(config):
        heads, hidden = getattr(sub, "num_attention_heads", None), getattr(sub, "hidden_size", None)
        if not heads or not hidden:
            continue
        head_dim = getattr(sub, "head_dim", None) or hidden // heads
        if head_dim >= min_head_dim:
            continue
        factor = -(-min_head_dim // head_dim)
        sub.hidden_size = hidden * factor
        if vars(sub).get("head_dim"):  # (a property on some configs: derived from hidden_size)
            sub.head_dim = head_dim * factor
        if (getattr(sub, "head_dim", None) or sub.hidden_size // heads) < min_head_dim:
            return None  # head dims of their own (MLA: qk_nope/qk_rope/v_head_dim)
    return config


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


def model_shifts_labels(model: torch.nn.Module) -> bool:
    """Whether ``model`` shifts ``labels`` inside its loss (most causal LMs); False for the
    decoders whose ``labels[t]`` is the target of ``logits[t]`` (their registry entry says so)."""
    from .api import STATE_ATTR, find_hf_model
    from .registry import REGISTRY, _load_entries

    hf_model = find_hf_model(model)
    state = vars(hf_model).get(STATE_ATTR)
    if state is not None:
        return state.entry.shifts_labels
    _load_entries()
    entry = REGISTRY.get(getattr(hf_model.config, "model_type", None))
    return True if entry is None else entry.shifts_labels


def _own_labels(seq: torch.Tensor, shifts: bool) -> torch.Tensor:
    if shifts:
        return seq[None]
    return torch.cat([seq[1:], seq.new_full((1,), -100)])[None]


def run_separate(model: torch.nn.Module, batch: PackedBatch, *, grads: bool = True) -> Run:
    """Each sequence of ``batch`` alone (no cache), as the ground truth."""
    batch = batch.to(_model_device(model))
    shifts = model_shifts_labels(model)
    return _run_alone(
        model, [({"input_ids": s[None]}, s, _own_labels(s, shifts)) for s in batch.sequences], grads=grads
    )


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


def _takes_position_ids(model: torch.nn.Module) -> bool:
    from .api import is_patched
    from .patching import accepts_argument

    return is_patched(model) or accepts_argument(model.forward, "position_ids")


def run_packed(
    model: torch.nn.Module, batch: PackedBatch, *, grads: bool = True, use_cache: bool | None = False
) -> Run:
    """``batch`` packed, as a user would run it (``use_cache=None`` keeps the model's default)."""
    batch = batch.to(_model_device(model))
    extra = {} if use_cache is None else {"use_cache": use_cache}
    inputs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
    if not _takes_position_ids(model):
        del inputs["position_ids"]  # an unpatched model that numbers its tokens itself (4.57 BartForCausalLM)
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
            labels = batch.labels if model_shifts_labels(model) else batch.shifted_labels()
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


def compare_packed(
    model: torch.nn.Module,
    batch: PackedBatch,
    *,
    grads: bool = True,
    use_cache: bool | None = False,
    train: bool = True,
) -> Comparison:
    """Run each sequence alone and the packed batch; return the largest differences.

    The loss is the mean next-token cross-entropy over all sequences (no term crosses a
    boundary); gradients are of that loss. ``use_cache=None`` leaves the model's default.
    ``model_loss`` compares the model's own ``loss`` for ``labels=batch.labels`` with the
    token-weighted mean of the separate runs' losses.
    """
    was_training = model.training
    model.train(train)
    try:
        separate = run_separate(model, batch, grads=grads)
        packed = run_packed(model, batch, grads=grads, use_cache=use_cache)
        grad_err, worst = max_grad_error(packed, separate) if grads else (0.0, "")
        model_loss_err = 0.0 if packed.model_loss is None else abs(packed.model_loss - separate.model_loss)
        return Comparison(
            logits=max_logits_error(packed, separate),
            loss=abs(packed.loss - separate.loss),
            model_loss=model_loss_err,
            grads=grad_err,
            worst_grad=worst,
        )
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


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


# ---------------------------------------------------------------- a one-line check for users' suites

#: Layouts :func:`assert_packing_equivalent` packs: one row of three sequences; two rows, one
#: ending in padding (``attention_mask == 0``), as the self-check and ``hf-varlen-patch check`` do.
EQUIVALENCE_LAYOUTS = (
    dict(rows=[[5, 9, 3]]),
    dict(rows=[[5, 9, 3, 11], [12, 7]], extra_padding=3, seed=1),
)


def _model_for(model_or_config: Any) -> torch.nn.Module:
    """The model to check: the given one, or a tiny random twin of a config / model_type / local
    checkpoint directory (CPU, float32 or the entry's test dtype, recurrent layers long-lived)."""
    import os

    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(model_or_config, torch.nn.Module):
        return model_or_config
    config = model_or_config
    if isinstance(config, (str, os.PathLike)) and os.path.isdir(config):
        config = AutoConfig.from_pretrained(config)
    twin = tiny_config(config)
    torch.manual_seed(0)
    model = long_memory(AutoModelForCausalLM.from_config(twin))
    from .registry import REGISTRY

    entry = REGISTRY.get(twin.model_type)
    return model.to(entry.test_dtype if entry is not None else torch.float32)


def assert_packing_equivalent(
    model_or_config: Any,
    *,
    backend: str = "auto",
    tol: float | None = None,
    layouts: Sequence[dict] = EQUIVALENCE_LAYOUTS,
    grads: bool = True,
) -> Comparison:
    """Assert that packed batches give what each sequence gives alone, once ``apply`` is on.

    ``model_or_config``: your model (patched here if it is not yet, and unpatched again after),
    or a config, model_type or local checkpoint directory, of which a tiny random twin is built
    on the CPU. Compares logits, the loss and gradients (train mode) over ``layouts``
    (:func:`make_packed_batch` kwargs), with the default cache setting and ``use_cache=False``.
    ``tol``: absolute, default 1e-5 (1e-9 in float64); pass one for half precision, judged
    against the unpacked run's own noise. Raises ``AssertionError`` naming the worst error;
    returns the worst :class:`Comparison`. In a test suite::

        from hf_varlen_patch.testing import assert_packing_equivalent

        def test_my_model_packs():
            assert_packing_equivalent("path/to/checkpoint")   # or a config, or a model
    """
    from .api import apply, is_patched, unapply

    model = _model_for(model_or_config)
    dtype = next(model.parameters()).dtype
    if tol is None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"pass tol= for a {dtype} model: half precision needs a tolerance judged by its noise")
        tol = 1e-9 if dtype == torch.float64 else 1e-5
    patched_here = not is_patched(model)
    if patched_here:
        apply(model, backend)
    try:
        worst: Comparison | None = None
        device = _model_device(model)
        vocab = model.config.get_text_config().vocab_size
        for layout in layouts:
            batch = make_packed_batch(vocab_size=vocab, **layout).to(device)
            for use_cache in (None, False):
                result = compare_packed(model, batch, grads=grads, use_cache=use_cache)
                if worst is None or result.max_error > worst.max_error:
                    worst = result
                if not result.ok(tol):
                    raise AssertionError(
                        f"packed != separate for {type(model).__name__} (rows {layout['rows']}, use_cache="
                        f"{use_cache}): {result} exceeds {tol:g}"
                    )
        assert worst is not None
        return worst
    finally:
        if patched_here:
            unapply(model)


# ---------------------------------------------------------------- multimodal samples


#: Rows of samples with 0, 1 and 2 images; a video sample is added where the model takes videos
#: next to images.
MULTIMODAL_LAYOUTS = ([4, "image", 5], [6], [3, "image", 2, "image", 4])
VIDEO_LAYOUT = [5, "video", 2]


def multimodal_layouts(model_type: str) -> list[list[Any]]:
    """The standard sample layouts for ``model_type`` (tests, scan, check): text-only for entries
    that pack only text rows, plus :data:`VIDEO_LAYOUT` where videos mix with images."""
    spec = lookup(model_type).multimodal
    if spec is not None and model_type in spec.text_only:
        layouts = [[n for n in layout if isinstance(n, int)] for layout in MULTIMODAL_LAYOUTS]
    else:
        layouts = [list(layout) for layout in MULTIMODAL_LAYOUTS]
    if spec is not None and model_type in spec.videos_with_images:
        layouts.append(list(VIDEO_LAYOUT))
    return layouts


def multimodal_samples(model: torch.nn.Module, layouts: Sequence[Sequence[Any]], seed: int = 0) -> list[dict]:
    """Processor-like inputs of one sample per layout for a tiny vision-language twin (its entry's
    sample builder). A layout lists text lengths and ``"image"`` / ``"video"`` in order:
    ``[[5, "image", 3], [7], [2, "image", 1, "image", 4]]``."""
    from .api import find_hf_model
    from .registry import lookup

    hf_model = find_hf_model(model)
    spec = lookup(hf_model.config.model_type).multimodal
    if spec is None:
        raise ValueError(f"{hf_model.config.model_type} has no multimodal sample builder")
    generator = torch.Generator().manual_seed(seed)
    return [spec.sample(hf_model, list(layout), generator) for layout in layouts]


def inputs_on_model(model: torch.nn.Module, inputs: dict) -> dict:
    """Tensors on the model's device, floating ones (pixels) in its dtype."""
    param = next(model.parameters())
    return {
        k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
        if isinstance(v, torch.Tensor)
        else v
        for k, v in inputs.items()
    }


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
    denom = max(sum(n - 1 for n in lengths), 1)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        logits = model(**batch).logits[0]
        pieces = list(logits.split(lengths))
        ids = batch["input_ids"][0].split(lengths)
        loss = sum(_token_loss_sum(p, t) for p, t in zip(pieces, ids)) / denom
        if grads:
            loss.backward()
    with torch.no_grad():
        model_loss = float(model(**batch, labels=labels).loss)
    return Run([p.detach().float() for p in pieces], float(loss.detach()), model_loss, _grads(model) if grads else {})


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
    packed run); return the largest differences (logits, losses and every gradient, the vision
    tower's included)."""
    if layout not in ("positions", "cu"):
        raise ValueError(f"layout must be 'positions' or 'cu', not {layout!r}")
    was_training = model.training
    model.train(train)
    try:
        separate = _run_samples(model, samples, grads=grads)
        packed = _run_multimodal_packed(model, samples, grads=grads, layout=layout, use_cache=use_cache)
        grad_err, worst = max_grad_error(packed, separate) if grads else (0.0, "")
        return Comparison(
            logits=max_logits_error(packed, separate),
            loss=abs(packed.loss - separate.loss),
            model_loss=abs(packed.model_loss - separate.model_loss),
            grads=grad_err,
            worst_grad=worst,
        )
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
