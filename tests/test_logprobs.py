"""``token_logprobs``: per-token log-probabilities (and entropies) of a padded batch, computed packed
with the LM head chunk by chunk, equal to each sequence alone through the model's own logits."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CONFIG_MAPPING

import hf_varlen_patch
from hf_varlen_patch.errors import UnsupportedArchitectureError, VarlenPatchError
from hf_varlen_patch.logprobs import token_logprobs
from hf_varlen_patch.testing import tiny_config, tiny_model

LENGTHS = (6, 13, 2, 9)


def _batch(vocab: int, side: str):
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(1, vocab, (n,), generator=gen) for n in LENGTHS]
    width = max(LENGTHS) + 1
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    starts = []
    for i, seq in enumerate(sequences):
        start = 0 if side == "right" or (side == "both" and i % 2) else width - len(seq)
        ids[i, start : start + len(seq)] = seq
        mask[i, start : start + len(seq)] = 1
        starts.append(start)
    return sequences, ids, mask, starts


def _reference(model, sequences, starts, width, temperature=1.0):
    """Each sequence alone through the model's own logits: (B, L) log-probs and entropies."""
    logps = torch.zeros(len(sequences), width)
    entropies = torch.zeros(len(sequences), width)
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        logits = model(input_ids=seq[None], use_cache=False).logits[0, :-1].float() / temperature
        logp = F.log_softmax(logits, dim=-1)
        logps[i, start + 1 : start + len(seq)] = logp.gather(-1, seq[1:, None])[:, 0]
        entropies[i, start + 1 : start + len(seq)] = -(logp.exp() * logp).sum(-1)
    return logps, entropies


@pytest.mark.parametrize("side", ["right", "left", "both"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2", "granite", "cohere", "qwen3_next"])
def test_token_logprobs_equal_each_sequence_alone(model_type, side):
    if model_type not in CONFIG_MAPPING or hf_varlen_patch.lookup(model_type).refusal(tiny_config(model_type)):
        pytest.skip(f"{model_type} is not packed on this transformers release")
    model = tiny_model(model_type)
    sequences, ids, mask, starts = _batch(model.config.vocab_size, side)
    ref_logp, ref_entropy = _reference(model, sequences, starts, ids.shape[1], temperature=0.7)
    model.zero_grad(set_to_none=True)
    ref_logp.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    hf_varlen_patch.apply(model)
    try:
        logp, entropy = token_logprobs(model, ids, mask, temperature=0.7, chunk_tokens=5, entropies=True)
        logp.sum().backward()
    finally:
        hf_varlen_patch.unapply(model)
    assert logp.shape == ids.shape and logp.dtype == torch.float32
    assert torch.allclose(logp.detach(), ref_logp.detach(), atol=1e-5, rtol=0)
    assert torch.allclose(entropy.detach(), ref_entropy.detach(), atol=1e-5, rtol=0)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads)
    assert max(float((grads[n] - ref_grads[n]).abs().max()) for n in grads) < 1e-5


def test_chunks_do_not_change_the_result_and_no_full_logits_are_kept():
    model = tiny_model("llama").eval()
    sequences, ids, mask, _ = _batch(model.config.vocab_size, "right")
    hf_varlen_patch.apply(model)
    with torch.no_grad():
        whole = token_logprobs(model, ids, mask, chunk_tokens=10_000)
        chunked = token_logprobs(model, ids, mask, chunk_tokens=1)
    hf_varlen_patch.unapply(model)
    assert torch.equal(whole == 0, chunked == 0)
    assert torch.allclose(whole, chunked, atol=1e-6, rtol=0)


def test_refusals():
    model = tiny_model("llama").eval()
    _, ids, mask, _ = _batch(model.config.vocab_size, "right")
    with pytest.raises(VarlenPatchError, match="apply"):
        token_logprobs(model, ids, mask)
    hf_varlen_patch.apply(model)
    with pytest.raises(ValueError, match="shape"):
        token_logprobs(model, ids, mask[:, :-1])
    # a head that post-processes its logits otherwise than this module knows: caught, not guessed
    model.config.final_logit_softcapping = 0.01
    with pytest.raises(UnsupportedArchitectureError, match="post-processes"):
        token_logprobs(model, ids, mask)
    hf_varlen_patch.unapply(model)
