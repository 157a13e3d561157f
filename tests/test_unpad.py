"""``apply(model, unpad=True)``: a padded batch runs its real tokens packed, and every head sees
the padded layout it expects. Equal to each sequence alone (logits, loss, gradients), for right,
left and mixed padding, text and vision-language batches; for right padding also upstream's
padded result. Calls with a cache, and
calls without padding, run upstream's code unchanged."""

import copy
import pickle

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForSequenceClassification, AutoModelForTokenClassification

import hf_varlen_patch
from hf_varlen_patch.attention import BACKEND_USAGE
from hf_varlen_patch.errors import PackedCallError
from hf_varlen_patch.testing import (
    compare_multimodal,
    multimodal_layouts,
    multimodal_samples,
    registered_variants,
    tiny_config,
    tiny_model,
)

LENGTHS = (5, 11, 3, 9)
TYPES = ["llama", "gpt2", "qwen2", "mistral", "gemma2", "bloom", "opt", "mixtral", "qwen3_next", "bamba"]
SIDES = ["right", "left", "both"]


def _available(model_type: str) -> None:
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"{model_type} is not in this transformers release")
    entry = hf_varlen_patch.lookup(model_type)
    reason = entry.refusal(tiny_config(model_type))
    if reason:
        pytest.skip(f"{model_type} is refused on this transformers release: {reason}")


def _padded(sequences, side: str, extra: int = 2):
    """Rows of one sequence each, padded on ``side`` ("both": alternately left and right, plus
    padding on both ends of one row) to the longest plus ``extra``."""
    width = max(len(s) for s in sequences) + extra
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        room = width - len(seq)
        start = {"right": 0, "left": room}.get(side, (room // 2) if i % 2 else (room if i % 3 else 0))
        ids[i, start : start + len(seq)] = seq
        mask[i, start : start + len(seq)] = 1
    return ids, mask


def _labels(ids, mask):
    """Next-token targets within each sequence: padding and each sequence's first token -100 (the
    first is the target of a padding position under left padding)."""
    labels = ids.masked_fill(mask == 0, -100)
    first = (mask.cumsum(1) == 1) & (mask == 1)
    return labels.masked_fill(first, -100)


def _sequences(vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen) for n in LENGTHS]


def _alone(model, sequences):
    """Logits of each sequence alone and gradients of the token-weighted mean of their losses."""
    model.zero_grad(set_to_none=True)
    targets = sum(len(s) - 1 for s in sequences)
    logits = []
    for seq in sequences:
        out = model(input_ids=seq[None], labels=seq[None], use_cache=False)
        (out.loss * (len(seq) - 1) / targets).backward()
        logits.append(out.logits[0].detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits, grads


def _padded_run(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def _max_grad_error(a: dict, b: dict) -> float:
    keys = set(a) | set(b)
    zero = lambda k: torch.zeros_like(a.get(k, b.get(k)))  # noqa: E731
    return max(float((a.get(k, zero(k)) - b.get(k, zero(k))).abs().max()) for k in keys)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("model_type", TYPES)
def test_a_padded_batch_runs_packed_and_equals_each_sequence_alone(model_type, side):
    _available(model_type)
    model = tiny_model(model_type)
    if model_type == "mixtral":
        model.config.output_router_logits = False  # the aux loss is batch-wide: checked against upstream below
    sequences = _sequences(model.config.get_text_config().vocab_size)
    ids, mask = _padded(sequences, side)
    labels = _labels(ids, mask)
    alone_logits, alone_grads = _alone(model, sequences)
    hf_varlen_patch.apply(model, unpad=True)
    packed_calls = sum(BACKEND_USAGE.values())
    try:
        out, grads = _padded_run(model, ids, mask, labels)
    finally:
        hf_varlen_patch.unapply(model)
    assert sum(BACKEND_USAGE.values()) > packed_calls  # the padded batch really ran packed
    for i, logits in enumerate(alone_logits):
        assert torch.allclose(out.logits[i][mask[i] == 1], logits, atol=1e-5, rtol=0), (i, side)
    targets = sum(len(s) - 1 for s in sequences)
    with torch.no_grad():
        alone_loss = sum(
            float(model(input_ids=s[None], labels=s[None], use_cache=False).loss) * (len(s) - 1) for s in sequences
        )
    assert abs(float(out.loss.detach()) - alone_loss / targets) < 1e-5
    assert _max_grad_error(grads, alone_grads) < 1e-5


def test_right_padding_equals_upstream_padded_and_left_padding_shows_where_upstream_differs():
    """GPT-2 numbers a left-padded row's tokens from the row start (absolute positions), so
    upstream's own padded result is not each sequence alone; unpad=True is."""
    model = tiny_model("gpt2").eval()
    sequences = _sequences(model.config.vocab_size)
    errors = {}
    for side in ("right", "left"):
        ids, mask = _padded(sequences, side)
        with torch.no_grad():
            upstream = model(input_ids=ids, attention_mask=mask).logits
            hf_varlen_patch.apply(model, unpad=True)
            unpadded = model(input_ids=ids, attention_mask=mask).logits
            hf_varlen_patch.unapply(model)
            alone = [model(input_ids=s[None]).logits[0] for s in sequences]
        real = mask == 1
        errors[side] = (
            float((unpadded[real] - upstream[real]).abs().max()),
            max(float((unpadded[i][real[i]] - a).abs().max()) for i, a in enumerate(alone)),
            max(float((upstream[i][real[i]] - a).abs().max()) for i, a in enumerate(alone)),
        )
    assert errors["right"][0] < 1e-5 and errors["right"][1] < 1e-5
    assert errors["left"][1] < 1e-5  # unpad: each sequence alone
    assert errors["left"][2] > 1e-2  # upstream's left-padded result is not


def test_mixtral_router_aux_loss_equals_upstream_padded():
    """Router logits come back per padded token (zeros at padding), so the load-balancing loss,
    which upstream computes over the mask's real tokens, is upstream's."""
    model = tiny_model("mixtral")
    model.config.output_router_logits = True
    sequences = _sequences(model.config.vocab_size)
    ids, mask = _padded(sequences, "right")
    labels = _labels(ids, mask)
    upstream, upstream_grads = _padded_run(model, ids, mask, labels)
    hf_varlen_patch.apply(model, unpad=True)
    try:
        out, grads = _padded_run(model, ids, mask, labels)
    finally:
        hf_varlen_patch.unapply(model)
    assert float(upstream.aux_loss) > 0
    assert abs(float(out.aux_loss) - float(upstream.aux_loss)) < 1e-6
    assert abs(float(out.loss) - float(upstream.loss)) < 1e-5
    assert _max_grad_error(grads, upstream_grads) < 1e-5


@pytest.mark.parametrize("side", ["right", "left"])
def test_heads_see_the_padded_layout(side):
    """Sequence classification pools each row's last real token, token classification scores every
    token: both equal each sequence alone."""
    config = tiny_config("llama")
    config.pad_token_id = 0
    config.num_labels = 3
    sequences = _sequences(config.vocab_size)
    ids, mask = _padded(sequences, side)
    for cls in (AutoModelForSequenceClassification, AutoModelForTokenClassification):
        torch.manual_seed(0)
        model = cls.from_config(config).eval()
        with torch.no_grad():
            alone = [model(input_ids=s[None]).logits[0] for s in sequences]
            hf_varlen_patch.apply(model, unpad=True)
            out = model(input_ids=ids, attention_mask=mask).logits
            hf_varlen_patch.unapply(model)
        for i, expected in enumerate(alone):
            got = out[i] if cls is AutoModelForSequenceClassification else out[i][mask[i] == 1]
            assert torch.allclose(got, expected, atol=1e-5, rtol=0), (cls.__name__, i)


def test_hidden_states_and_inputs_embeds_come_back_padded():
    model = tiny_model("llama").eval()
    sequences = _sequences(model.config.vocab_size)
    ids, mask = _padded(sequences, "both")
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        alone = [model(input_ids=s[None], output_hidden_states=True).hidden_states[-1][0] for s in sequences]
        hf_varlen_patch.apply(model, unpad=True)
        out = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        hf_varlen_patch.unapply(model)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    last = out.hidden_states[-1]
    assert last.shape == (*ids.shape, model.config.hidden_size)
    assert float(last[mask == 0].abs().max()) == 0.0
    for i, expected in enumerate(alone):
        assert torch.allclose(last[i][mask[i] == 1], expected, atol=1e-5, rtol=0)


def test_calls_with_a_cache_or_without_padding_run_upstream_unchanged():
    model = tiny_model("llama").eval()
    sequences = _sequences(model.config.vocab_size)
    ids, mask = _padded(sequences, "left")
    full = torch.ones_like(ids)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        unpadded_call = model(input_ids=ids, attention_mask=full).logits
        hf_varlen_patch.apply(model, unpad=True)
        assert torch.equal(
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False), generated
        )
        assert torch.equal(model(input_ids=ids, attention_mask=full).logits, unpadded_call)
        hf_varlen_patch.unapply(model)


def test_malformed_padding_is_refused_with_the_fix():
    model = tiny_model("llama").eval()
    hf_varlen_patch.apply(model, unpad=True)
    ids = torch.randint(1, 100, (2, 8))
    holes = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]])
    with pytest.raises(PackedCallError, match="one run"):
        model(input_ids=ids, attention_mask=holes)
    left = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    from_row_start = torch.arange(8).expand(2, 8)
    with pytest.raises(PackedCallError, match="numbered from 0"):
        model(input_ids=ids, attention_mask=left, position_ids=from_row_start)
    own = (left.cumsum(1) - 1).clamp_min(0)
    model(input_ids=ids, attention_mask=left, position_ids=own)  # each sequence from 0: runs
    hf_varlen_patch.unapply(model)


def test_the_option_survives_copies_and_is_undone():
    model = tiny_model("gpt2").eval()
    sequences = _sequences(model.config.vocab_size)
    ids, mask = _padded(sequences, "left")
    with torch.no_grad():
        alone = model(input_ids=sequences[0][None]).logits[0]
        hf_varlen_patch.apply(model, unpad=True)
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            got = twin(input_ids=ids, attention_mask=mask).logits[0][mask[0] == 1]
            assert torch.allclose(got, alone, atol=1e-5, rtol=0)
        hf_varlen_patch.unapply(model)
        upstream = model(input_ids=ids, attention_mask=mask).logits[0][mask[0] == 1]
    assert float((upstream - alone).abs().max()) > 1e-2  # unapply: upstream's left padding again


@pytest.mark.parametrize("model_type, variant", registered_variants())
def test_every_registered_type_unpads_exactly(model_type, variant, monkeypatch):
    """Forward only, over the whole registry: each padded row (left, right, both) equals its
    sequence alone on the unpatched model, and the call really ran unpadded."""
    from hf_varlen_patch import patching

    plans = []
    plan = patching.plan_unpadding
    monkeypatch.setattr(patching, "plan_unpadding", lambda call: plans.append(plan(call)) or plans[-1])
    model = tiny_model(model_type, variant).eval()
    sequences = _sequences(model.config.get_text_config().vocab_size, seed=1)[:3]
    with torch.no_grad():
        alone = [model(input_ids=s[None], use_cache=False).logits[0].double() for s in sequences]
        hf_varlen_patch.apply(model, unpad=True)
        try:
            for side in SIDES:
                ids, mask = _padded(sequences, side)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.double()
                for i, expected in enumerate(alone):
                    error = float((logits[i][mask[i] == 1] - expected).abs().max())
                    assert error < 1e-5, (side, i, error)
        finally:
            hf_varlen_patch.unapply(model)
    assert len([p for p in plans if p is not None]) == len(SIDES)


@pytest.mark.parametrize("model_type", sorted({mt for mt, _ in registered_variants(multimodal=True)}))
def test_vision_language_batches_unpad_exactly(model_type, monkeypatch):
    """Samples with 0, 1 and 2 images (a video for the Qwen-VL family), one per row of a padded
    batch (right or left), images in row order: with ``unpad=True`` each row equals its sample
    alone in logits, loss and every gradient (vision tower included), and ran unpadded."""
    from hf_varlen_patch import patching

    plans = []
    plan = patching.plan_unpadding
    monkeypatch.setattr(patching, "plan_unpadding", lambda call: plans.append(plan(call)) or plans[-1])
    model = tiny_model(model_type, attn_implementation="sdpa")
    samples = multimodal_samples(model, multimodal_layouts(model_type), seed=1)
    hf_varlen_patch.apply(model, unpad=True)
    for side in ("right", "left"):
        result = compare_multimodal(model, samples, layout=side)
        assert result.ok(1e-5), (side, result)
    assert len([p for p in plans if p is not None]) == 4  # per side: the forward and the loss forward
