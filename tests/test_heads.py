"""Every registered type x every head class transformers maps for it: a packed batch gives
exactly what each sequence alone gives (one score per sequence for sequence classification,
per-token outputs for token heads, labels as each head takes them), or a typed refusal."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from transformers.models.auto import modeling_auto

import hf_varlen_patch
from hf_varlen_patch.errors import PackedCallError, UnsupportedArchitectureError, VarlenPatchError
from hf_varlen_patch.heads import head_kind
from hf_varlen_patch.registry import lookup
from hf_varlen_patch.testing import compare_packed, make_packed_batch, registered_variants, test_variants

TOL = 1e-5
NUM_LABELS = 3
#: heads of other modalities or tasks than a text batch (never built for a text decoder here)
SKIP_MAPPINGS = (
    "CAUSAL_LM",
    "IMAGE",
    "VISION",
    "AUDIO",
    "SPEECH",
    "VIDEO",
    "CTC",
    "DEPTH",
    "SEMANTIC",
    "OBJECT",
    "KEYPOINT",
    "ZERO_SHOT",
    "TIME_SERIES",
    "TEXT_TO",
    "MASK_GENERATION",
    "UNIVERSAL",
    "INSTANCE",
    "DOCUMENT",
    "TABLE",
    "PANOPTIC",
    "BACKBONE",
    "RETRIEVAL",
    "SEQ_TO_SEQ",
    "XVECTOR",
    "FRAME",
    "TEXT_ENCODING",
    "MULTIMODAL",
)
LAYOUTS = (dict(rows=[[5, 9, 3]]), dict(rows=[[5, 9, 3, 4], [6, 7]], extra_padding=2, seed=1))


def _head_classes(model_type: str) -> list[str]:
    import transformers

    names = []
    for attr in sorted(dir(modeling_auto)):
        if not (attr.startswith("MODEL_FOR_") and attr.endswith("_MAPPING_NAMES")):
            continue
        if any(word in attr for word in SKIP_MAPPINGS):
            continue
        value = getattr(modeling_auto, attr).get(model_type)
        for name in (value,) if isinstance(value, str) else (value or ()):
            if hasattr(transformers, name) and name not in names:
                names.append(name)
    return names


CASES = [
    (mt, variant, cls)
    for mt, variant in registered_variants()
    if variant in ("twin", "decoder", "default") or variant == next(iter(test_variants(mt)))
    for cls in _head_classes(mt)
]


@functools.cache
def _config(model_type: str, variant: str):
    return copy.deepcopy(test_variants(model_type)[variant])  # keeps the variant's attention implementation


def _build(model_type: str, variant: str | None, class_name: str, pad_token_id):
    import transformers

    config = _config(model_type, variant or next(iter(test_variants(model_type))))
    config.pad_token_id = pad_token_id
    config.num_labels = 2 if "QuestionAnswering" in class_name else NUM_LABELS  # a start and an end score
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config)
    # eval: heads add dropout (0.1 by default for token classification); gradients still flow
    return model.to(lookup(model_type).test_dtype).eval()


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _grad_error(a: dict, b: dict) -> float:
    """Largest difference; a gradient one side lacks counts as zero there."""
    worst = 0.0
    for key in set(a) | set(b):
        x = a.get(key, torch.zeros_like(b.get(key, a.get(key))))
        y = b.get(key, torch.zeros_like(x))
        worst = max(worst, (x - y).abs().max().item())
    return worst


def _alone(model, seq: torch.Tensor, **kwargs):
    return (
        model(input_ids=seq[None], use_cache=False, **kwargs)
        if _takes_cache(model)
        else model(input_ids=seq[None], **kwargs)
    )


def _takes_cache(model) -> bool:
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _packed(model, batch, **kwargs):
    inputs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
    if _takes_cache(model):
        inputs["use_cache"] = False
    return model(**inputs, **kwargs)


def _check_sequence_classification(model, batch):
    n = len(batch.sequences)
    labels = torch.arange(n) % NUM_LABELS
    model.zero_grad(set_to_none=True)
    out = _packed(model, batch, labels=labels)
    assert out.logits.shape == (n, NUM_LABELS), out.logits.shape
    out.loss.backward()
    packed = _grads(model)
    model.zero_grad(set_to_none=True)
    alone = [_alone(model, s).logits for s in batch.sequences]
    loss = sum(F.cross_entropy(a, labels[i : i + 1]) for i, a in enumerate(alone)) / n
    loss.backward()
    logits_err = (out.logits - torch.cat(alone)).abs().max().item()
    return logits_err, abs(out.loss.item() - loss.item()), _grad_error(packed, _grads(model))


def _check_token_head(model, batch, vocab: int):
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, vocab, batch.input_ids.shape, generator=gen)
    labels = labels.masked_fill(batch.labels == -100, -100)
    model.zero_grad(set_to_none=True)
    out = _packed(model, batch, labels=labels)
    out.loss.backward()
    packed = _grads(model)
    model.zero_grad(set_to_none=True)
    count = int((labels != -100).sum())
    loss, errs = 0.0, []
    for (row, start, n), seq in zip(batch.spans, batch.sequences):
        logits = _alone(model, seq).logits[0]
        errs.append((out.logits[row, start : start + n] - logits).abs().max().item())
        target = labels[row, start : start + n]
        term = F.cross_entropy(logits, target, reduction="sum", ignore_index=-100) / count
        term.backward()
        loss += term.item()
    return max(errs), abs(out.loss.item() - loss), _grad_error(packed, _grads(model))


def _check_question_answering(model, batch):
    out = _packed(model, batch)
    errs = []
    for (row, start, n), seq in zip(batch.spans, batch.sequences):
        alone = _alone(model, seq)
        errs.append((out.start_logits[row, start : start + n] - alone.start_logits[0]).abs().max().item())
        errs.append((out.end_logits[row, start : start + n] - alone.end_logits[0]).abs().max().item())
    with pytest.raises(PackedCallError, match="span loss"):
        _packed(
            model,
            batch,
            start_positions=torch.zeros(batch.input_ids.shape[0], dtype=torch.long),
            end_positions=torch.ones(batch.input_ids.shape[0], dtype=torch.long),
        )
    return max(errs), 0.0, 0.0


def _check_base(model, batch):
    out = _packed(model, batch)
    errs = []
    for (row, start, n), seq in zip(batch.spans, batch.sequences):
        alone = _alone(model, seq).last_hidden_state[0]
        errs.append((out.last_hidden_state[row, start : start + n] - alone).abs().max().item())
    return max(errs), 0.0, 0.0


def head_outcome(model_type: str, variant: str, class_name: str, pad_token_id) -> str:
    """Run one cell of the matrix; returns how it ended ("exact", "refused at apply: ...",
    "refused at call: ...", "upstream cannot run: ..."); raises AssertionError if inexact."""
    try:
        model = _build(model_type, variant, class_name, pad_token_id)
        if head_kind(model) != "other":  # other heads take other inputs (choices): refused below anyway
            with torch.no_grad():
                _alone(model, torch.arange(1, 6))
    except Exception as err:  # upstream cannot build or run this head on this config: nothing to pack
        return f"upstream cannot run: {type(err).__name__}"
    try:
        hf_varlen_patch.apply(model)
    except UnsupportedArchitectureError as err:
        return f"refused at apply: {str(err)[:80]}"
    kind = head_kind(model)
    for layout in LAYOUTS:
        batch = make_packed_batch(vocab_size=_config(model_type, variant).vocab_size, **layout)
        try:
            if kind == "sequence_classification":
                errors = _check_sequence_classification(model, batch)
            elif kind == "token":
                vocab = NUM_LABELS if "Token" in class_name else model.config.vocab_size
                errors = _check_token_head(model, batch, vocab)
            elif kind == "question_answering":
                errors = _check_question_answering(model, batch)
            elif kind == "base":
                errors = _check_base(model, batch)
            elif kind == "causal_lm":
                result = compare_packed(model, batch)
                errors = (result.logits, result.model_loss, result.grads)
            else:
                with pytest.raises(VarlenPatchError) as refused:
                    _packed(model, batch)
                return f"refused at call: {type(refused.value).__name__}"
        except PackedCallError as err:
            assert kind in ("sequence_classification", "question_answering"), err
            return f"refused at call: {str(err)[:80]}"
        assert max(errors) < TOL, f"{model_type}/{class_name} ({kind}), rows {layout['rows']}: {errors}"
    return "exact"


@pytest.mark.parametrize("model_type, variant, class_name", CASES)
@pytest.mark.parametrize("pad_token_id", [None, 0])
def test_every_head_is_exact_or_refused(model_type, variant, class_name, pad_token_id):
    outcome = head_outcome(model_type, variant, class_name, pad_token_id)
    if outcome.startswith("upstream cannot run"):
        pytest.skip(f"{class_name} on the tiny config: {outcome}")


def test_token_classification_labels_are_not_masked_at_sequence_starts():
    """The causal-LM rule (-100 at every start) would drop real targets of a head that does not shift."""
    model = hf_varlen_patch.apply(_build("llama", None, "LlamaForTokenClassification", None))
    batch = make_packed_batch([[5, 9, 3]], 128)
    errors = _check_token_head(model, batch, NUM_LABELS)
    assert max(errors) < TOL, errors


def test_sequence_classification_scores_each_sequence_and_takes_one_label_each():
    model = hf_varlen_patch.apply(_build("llama", None, "LlamaForSequenceClassification", 0))
    batch = make_packed_batch([[5, 9, 3]], 128)
    out = _packed(model, batch)
    assert out.logits.shape == (3, NUM_LABELS)
    with pytest.raises(PackedCallError, match=r"one label per sequence.*\(3,\)"):
        _packed(model, batch, labels=torch.tensor([1]))
    # a row's trailing padding (the packing collator's: pad ids, no mask) gets no score
    padded = torch.cat([batch.input_ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    positions = torch.cat([batch.position_ids, torch.arange(4)[None]], dim=1)
    out_padded = model(input_ids=padded, position_ids=positions, use_cache=False)
    assert torch.allclose(out_padded.logits, out.logits, atol=TOL)


def test_sequence_classification_pools_the_last_non_pad_token_as_alone():
    """A sequence ending in pad tokens (pad == eos) is pooled where upstream pools it alone."""
    model = hf_varlen_patch.apply(_build("llama", None, "LlamaForSequenceClassification", 5))
    seqs = [torch.tensor([7, 8, 9, 5, 5]), torch.tensor([3, 4]), torch.tensor([5, 5, 5])]
    ids = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    out = model(input_ids=ids, position_ids=positions, use_cache=False)
    alone = torch.cat([model(input_ids=s[None], use_cache=False).logits for s in seqs[:2]])
    # the all-pad segment is padding, not a sequence
    assert out.logits.shape == (2, NUM_LABELS)
    assert (out.logits - alone).abs().max() < TOL


def test_return_dict_false_keeps_upstream_tuple_order():
    model = hf_varlen_patch.apply(_build("llama", None, "LlamaForSequenceClassification", None))
    batch = make_packed_batch([[5, 9, 3], [4, 4]], 128, extra_padding=1)
    labels = torch.tensor([0, 1, 2, 0, 1])
    as_dict = _packed(model, batch, labels=labels)
    as_tuple = _packed(model, batch, labels=labels, return_dict=False)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
