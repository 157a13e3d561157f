"""Unpacked calls after ``apply`` are upstream's, bit for bit, for every registered type.

"Packed" means restarting ``position_ids`` or ``cu_seq_lens_*``; anything else must run
upstream's code unchanged: plain and padded batches (left and right padding, with and without
explicit ``position_ids``), labels, the default cache and ``use_cache=False``, gradients, and
``generate()``. Each type's patched model is compared with an unpatched copy of the same weights
with ``torch.equal`` (no tolerance). Where upstream's forward takes no ``position_ids`` (4.57's
BartForCausalLM and kin raise TypeError), the patched one accepts them, as collators send them,
and must give what upstream gives without them. The differences that remain are listed in
:data:`KNOWN_DIFFERENCES`, each call by name, and stated exactly by a test of their own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers

import hf_varlen_patch
from hf_varlen_patch.patching import accepts_argument
from hf_varlen_patch.testing import (
    inputs_on_model,
    multimodal_layouts,
    multimodal_samples,
    registered_variants,
    tiny_model,
)

TEXT = registered_variants()
MULTIMODAL = registered_variants(multimodal=True)
LENGTH = 8
PADDING = 3  # pad tokens in the padded row
#: Calls also run with ``use_cache=False`` (the rest with the default cache only, to keep CI short).
BOTH_CACHES = frozenset({"ids", "right_padding_positions", "labels", "labels_padding_positions", "text_ids", "images"})
#: Calls run only for gradients (train mode), not in the forward comparison.
GRAD_ONLY = frozenset({"labels_padding"})

#: Calls below that carry explicit ``position_ids`` (``generate()`` passes them too).
WITH_POSITIONS = frozenset(
    {
        "positions",
        "right_padding_positions",
        "right_padding_arange",
        "left_padding_positions",
        "left_padding_arange",
        "labels_padding_positions",
        "grad:labels_padding_positions",
        "generate",
    }
)
#: Padded batches of several rows with ``position_ids`` (the padding's own logits).
PADDED_ROWS_WITH_POSITIONS = WITH_POSITIONS - {"positions", "generate"}
ROBERTA_FAMILY = (
    "camembert",
    "data2vec-text",
    "roberta",
    "roberta-prelayernorm",
    "xlm-roberta",
    "xlm-roberta-xl",
    "xmod",
)

#: The only unpacked calls allowed to differ from upstream: (model_type, variant or None for
#: all) -> (the calls that differ, why). Every other call of every registered type is
#: bit-identical; a listed call that stops differing fails too, so the list stays exact.
KNOWN_DIFFERENCES: dict[tuple[str, str | None], tuple[frozenset[str], str]] = {
    **{
        (model_type, None): (
            WITH_POSITIONS,
            "explicit position_ids are numbered as the model numbers tokens without them (padding_idx + 1 "
            "on, skipping pad tokens), where upstream indexes its table with them raw: a row of 0-based "
            "positions cannot be told from a packing collator's row that holds one sequence, which must "
            "number as that sequence alone (logits 0.40-0.67 apart on the twins)",
        )
        for model_type in ROBERTA_FAMILY
    },
    ("phimoe", "longrope"): (
        PADDED_ROWS_WITH_POSITIONS,
        "LongRoPE: rows with position_ids run as one sequence each, so every row gets its own regime "
        "(upstream: the longest row's); real tokens' logits and the loss are upstream's (bit for bit on "
        "5.x, within 1.3e-7 on 4.57), padding tokens' logits differ (0.3-0.6: padding attends only to "
        "padding) and gradients by float rounding (2e-9 on 5.x, 9e-8 on 4.57)",
    ),
}


def _known(model_type: str, variant: str) -> tuple[frozenset[str], str]:
    for key in ((model_type, variant), (model_type, None)):
        if key in KNOWN_DIFFERENCES:
            return KNOWN_DIFFERENCES[key]
    return frozenset(), ""


def _special_ids(config: Any) -> set[int]:
    return {v for k, v in config.to_dict().items() if k.endswith(("token_id", "token_index")) and isinstance(v, int)}


def _pad_id(config: Any) -> int:
    pad = getattr(config.get_text_config(), "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


def _text_ids(model: torch.nn.Module, rows: int, length: int, seed: int) -> torch.Tensor:
    """Random ordinary tokens (no pad, bos/eos or placeholder ids)."""
    config = model.config
    vocab = config.get_text_config().vocab_size
    ordinary = torch.tensor([i for i in range(1, vocab) if i not in _special_ids(config)])
    gen = torch.Generator().manual_seed(seed)
    return ordinary[torch.randint(len(ordinary), (rows, length), generator=gen)]


def _padded(ids: torch.Tensor, pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 1 of ``ids`` shortened by PADDING tokens of padding on ``side``: (input_ids, mask)."""
    ids = ids.clone()
    mask = torch.ones_like(ids)
    where = slice(ids.shape[1] - PADDING, None) if side == "right" else slice(0, PADDING)
    ids[1, where] = pad_id
    mask[1, where] = 0
    return ids, mask


def _generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """What ``generate()`` passes for a padded batch: cumsum - 1, padding at 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _arange(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1]).expand_as(ids).clone()


def _calls(model: torch.nn.Module) -> dict[str, dict]:
    """The unpacked calls: name -> kwargs (no ``use_cache``)."""
    pad = _pad_id(model.config)
    ids = _text_ids(model, 2, LENGTH, seed=1)
    right, right_mask = _padded(ids, pad, "right")
    left, left_mask = _padded(ids, pad, "left")
    labels = right.masked_fill(right_mask == 0, -100)
    return {
        "one_row": dict(input_ids=ids[:1]),
        "ids": dict(input_ids=ids),
        "positions": dict(input_ids=ids, position_ids=_arange(ids)),
        "right_padding": dict(input_ids=right, attention_mask=right_mask),
        "right_padding_positions": dict(
            input_ids=right, attention_mask=right_mask, position_ids=_generate_positions(right_mask)
        ),
        "right_padding_arange": dict(input_ids=right, attention_mask=right_mask, position_ids=_arange(right)),
        "left_padding": dict(input_ids=left, attention_mask=left_mask),
        "left_padding_positions": dict(
            input_ids=left, attention_mask=left_mask, position_ids=_generate_positions(left_mask)
        ),
        "left_padding_arange": dict(input_ids=left, attention_mask=left_mask, position_ids=_arange(left)),
        "labels": dict(input_ids=ids, labels=ids),
        "labels_padding": dict(input_ids=right, attention_mask=right_mask, labels=labels),
        "labels_padding_positions": dict(
            input_ids=right, attention_mask=right_mask, labels=labels, position_ids=_generate_positions(right_mask)
        ),
    }


def _multimodal_calls(model: torch.nn.Module, model_type: str) -> dict[str, dict]:
    """Text-only rows (one, and two stacked), and one sample with its images (if the type takes them)."""
    text = multimodal_samples(model, [[LENGTH], [LENGTH]], seed=1)
    stacked = {k: torch.cat([s[k] for s in text]) for k in text[0]}
    calls = {
        "text_one_row": dict(text[0]),
        "text_ids": stacked,
        "text_positions": dict(stacked, position_ids=_arange(stacked["input_ids"])),
        "text_labels": dict(stacked, labels=stacked["input_ids"]),
    }
    with_images = [layout for layout in multimodal_layouts(model_type) if any(isinstance(p, str) for p in layout)]
    if with_images:
        sample = multimodal_samples(model, with_images[:1], seed=2)[0]
        calls["images"] = sample
        calls["images_labels"] = dict(sample, labels=sample["input_ids"])
    return calls


def _fresh(model: torch.nn.Module, call: dict) -> dict:
    """The call's tensors copied (4.57's XGLM shifts the caller's position_ids in place)."""
    return inputs_on_model(model, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in call.items()})


def _run(model: torch.nn.Module, call: dict, use_cache: bool | None) -> Any:
    extra = {} if use_cache is None else {"use_cache": use_cache}
    try:
        with torch.no_grad():
            out = model(**_fresh(model, call), **extra)
    except Exception as err:  # upstream's own refusals must stay the same
        return type(err)
    return out.logits, getattr(out, "loss", None)


def _upstream_call(upstream: torch.nn.Module, call: dict) -> dict:
    """The call as upstream takes it: a forward without ``position_ids`` (4.57's BartForCausalLM
    and kin) raises TypeError for them, where the patched one accepts them (collators send them)
    and runs upstream's code without them."""
    if "position_ids" in call and not accepts_argument(upstream.forward, "position_ids"):
        return {k: v for k, v in call.items() if k != "position_ids"}
    return call


def _mismatches(upstream: torch.nn.Module, patched: torch.nn.Module, calls: dict[str, dict]) -> dict[str, list[str]]:
    """Call name -> how the patched model's outputs differ from upstream's (empty: identical)."""
    bad: dict[str, list[str]] = {}
    for name, call in calls.items():
        if name in GRAD_ONLY:
            continue
        for use_cache in (None, False) if name in BOTH_CACHES else (None,):
            want, got = _run(upstream, _upstream_call(upstream, call), use_cache), _run(patched, call, use_cache)
            where = f"use_cache={use_cache}"
            if isinstance(want, type) or isinstance(got, type):
                if want is not got:
                    bad.setdefault(name, []).append(f"{where}: upstream {_name(want)}, patched {_name(got)}")
                continue
            for what, a, b in zip(("logits", "loss"), want, got):
                if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                    bad.setdefault(name, []).append(f"{where}: {what} differ by {_diff(a, b)}")
    return bad


def _name(result: Any) -> str:
    return result.__name__ if isinstance(result, type) else "a result"


def _diff(a: torch.Tensor | None, b: torch.Tensor | None) -> str:
    if a is None or b is None:
        return "presence"
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return f"{(a.float() - b.float()).abs().max().item():.2e}"


def _grad_mismatches(upstream: torch.nn.Module, patched: torch.nn.Module, call: dict) -> list[str]:
    """Train mode, with labels: the losses and every parameter gradient equal."""
    grads = []
    for model, inputs in ((upstream, _upstream_call(upstream, call)), (patched, call)):
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # same dropout masks
        loss = model(**_fresh(model, inputs), use_cache=False).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
        model.eval()
    (loss_a, a), (loss_b, b) = grads
    bad = [] if torch.equal(loss_a, loss_b) else [f"train loss differs by {_diff(loss_a, loss_b)}"]
    if a.keys() != b.keys():
        bad.append(f"gradients of different parameters: {sorted(a.keys() ^ b.keys())[:4]}")
    differ = sorted(n for n in a.keys() & b.keys() if not torch.equal(a[n], b[n]))
    bad += [f"gradient of {n} differs by {_diff(a[n], b[n])}" for n in differ[:4]]
    return bad


def _generate_mismatch(upstream: torch.nn.Module, patched: torch.nn.Module, call: dict) -> list[str]:
    """Greedy generation with the default cache from a (left-padded) prompt: the same tokens."""
    out = []
    for model in (upstream, patched):
        try:
            with torch.no_grad():
                out.append(model.generate(**_fresh(model, call), max_new_tokens=4, do_sample=False))
        except Exception as err:
            out.append(type(err))
    a, b = out
    if isinstance(a, type) or isinstance(b, type):
        return [] if a is b else [f"generate: upstream {_name(a)}, patched {_name(b)}"]
    return [] if torch.equal(a, b) else [f"generate: tokens differ {a.tolist()} vs {b.tolist()}"]


def _twins(model_type: str, variant: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    upstream = tiny_model(model_type, variant).eval()
    patched = hf_varlen_patch.apply(copy.deepcopy(upstream))
    return upstream, patched


def _check(
    model_type: str,
    variant: str,
    calls_for: Callable[[torch.nn.Module], dict],
    grad_calls: tuple[str, ...],
    prompt: str,
) -> None:
    upstream, patched = _twins(model_type, variant)
    calls = calls_for(upstream)
    bad = _mismatches(upstream, patched, calls)
    for name in grad_calls:
        if found := _grad_mismatches(upstream, patched, calls[name]):
            bad[f"grad:{name}"] = found
    if found := _generate_mismatch(upstream, patched, calls[prompt]):
        bad["generate"] = found
    expected, reason = _known(model_type, variant)
    report = "\n".join(f"  {name}: {'; '.join(details)}" for name, details in sorted(bad.items()))
    assert set(bad) == expected, (
        f"{model_type}/{variant}: unpacked calls differ from upstream where not listed, or a listed "
        f"difference is gone (listed: {sorted(expected)}{'; ' + reason if reason else ''}):\n{report}"
    )


@pytest.mark.parametrize("model_type, variant", TEXT)
def test_unpacked_calls_are_upstreams(model_type, variant):
    _check(model_type, variant, _calls, ("labels_padding", "labels_padding_positions"), "left_padding")


@pytest.mark.parametrize("model_type, variant", MULTIMODAL)
def test_unpacked_multimodal_calls_are_upstreams(model_type, variant):
    _check(model_type, variant, lambda model: _multimodal_calls(model, model_type), ("text_labels",), "text_ids")


@pytest.mark.parametrize("model_type", sorted({mt for mt, _ in TEXT if mt in ROBERTA_FAMILY}))
def test_roberta_family_explicit_positions_number_as_without_them(model_type):
    """The roberta family's listed difference, stated exactly: an unpacked call with
    ``position_ids`` gives what upstream gives for the same call without them."""
    upstream, patched = _twins(model_type, None)
    calls = _calls(upstream)
    for name in sorted(WITH_POSITIONS & calls.keys()):
        without = {k: v for k, v in calls[name].items() if k != "position_ids"}
        for use_cache in (None, False):
            got, want = _run(patched, calls[name], use_cache), _run(upstream, without, use_cache)
            assert torch.equal(got[0], want[0]), (name, use_cache)
            assert (got[1] is None) == (want[1] is None) and (got[1] is None or torch.equal(got[1], want[1]))
            raw = _run(upstream, calls[name], use_cache)[0]
            assert (raw - want[0]).abs().max() > 0.1, (name, use_cache)  # upstream's raw indexing: the difference


@pytest.mark.skipif(("phimoe", "longrope") not in TEXT, reason="phimoe is not in this transformers")
def test_phimoe_longrope_rows_with_positions_run_as_sequences():
    """PhiMoE's listed difference, stated exactly: a padded batch with ``position_ids`` gives
    upstream's real-token logits and loss (rows in one regime; bit for bit on 5.x, where attention
    goes through the AttentionInterface; within float rounding on 4.57, whose legacy attention
    classes the packed path replaces), and where rows reach different LongRoPE regimes each row
    gets what it gets alone (upstream: the longest row's)."""
    upstream, patched = _twins("phimoe", "longrope")
    call = _calls(upstream)["labels_padding_positions"]
    real = call["attention_mask"].bool()
    (want, want_loss), (got, got_loss) = _run(upstream, call, False), _run(patched, call, False)
    if transformers.__version__.startswith("4."):
        assert (want[real] - got[real]).abs().max() <= 1e-6 and torch.equal(want_loss, got_loss)
    else:
        assert torch.equal(want[real], got[real]) and torch.equal(want_loss, got_loss)
    assert not torch.equal(want[~real], got[~real])

    long, short = 40, 8  # the twin's original context is 32 tokens
    ids = _text_ids(upstream, 2, long, seed=3)
    ids[1, short:] = _pad_id(upstream.config)
    mask = torch.ones_like(ids)
    mask[1, short:] = 0
    rows = dict(input_ids=ids, attention_mask=mask, position_ids=_generate_positions(mask), use_cache=False)
    with torch.no_grad():
        alone = [upstream(input_ids=ids[:1], use_cache=False).logits[0], upstream(input_ids=ids[1:, :short]).logits[0]]
        for model, error in ((patched, lambda e: e <= 1e-5), (upstream, lambda e: e > 1e-3)):
            logits = model(**rows).logits
            worst = max((logits[0] - alone[0]).abs().max(), (logits[1, :short] - alone[1]).abs().max())
            assert error(float(worst)), (model is patched, float(worst))


def test_left_padding_without_restart_is_not_packed():
    """Left padding whose positions keep counting (an ``arange`` over the row) is padding before
    the row's first real token, not a hole in a packed sequence."""
    from hf_varlen_patch.boundaries import Boundaries

    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    boundaries = Boundaries.from_position_ids(torch.arange(5).expand(2, 5), attention_mask=mask)
    assert not boundaries.is_packed
    assert boundaries.cu_seqlens.tolist() == [0, 3, 5, 10]
