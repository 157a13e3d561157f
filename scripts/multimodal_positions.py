"""Packed vision-language samples, upstream vs patched, by the position_ids the caller passes.

For every covered vision-language type of the installed transformers, samples with 0, 1 and 2
images (and a video where the model takes one next to images) run alone and packed in one row,
with the largest logits difference packed vs alone for:

- ``2-D``: position_ids restarting per sample (what text collators send);
- ``3-row``: each sample's own (temporal, height, width) rotary rows, concatenated (mRoPE models);
- ``4-row``: transformers' packed layout, a restarting text row before those rows (mRoPE models);
- ``cu``: the collator's cu_seq_lens_q/k and max_length_q/k, no position_ids;

upstream with ``use_cache=False``, upstream with the model's default cache, and patched
(``hf_varlen_patch.apply``, sdpa reference backend). CPU, float32 (the entry's test dtype).

    python scripts/multimodal_positions.py [model_type ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math

import torch

import hf_varlen_patch
from hf_varlen_patch.equivalence import _run_samples
from hf_varlen_patch.packing import pack_multimodal
from hf_varlen_patch.testing import (
    inputs_on_model,
    multimodal_layouts,
    multimodal_samples,
    registered_variants,
    tiny_model,
)


def rotary_rows(model, samples) -> torch.Tensor | None:
    """Each sample's own rotary positions (3, 1, n), concatenated; None for a 1-D rope model."""
    base = model.base_model
    if not hasattr(base, "get_rope_index"):
        return None
    params = inspect.signature(base.get_rope_index).parameters
    rows = []
    for s in samples:
        kwargs = {k: s[k] for k in ("image_grid_thw", "video_grid_thw", "mm_token_type_ids") if k in s and k in params}
        ids = s["input_ids"]
        rows.append(base.get_rope_index(ids, attention_mask=torch.ones_like(ids), **kwargs)[0])
    return torch.cat(rows, dim=-1)


def packed_error(model, samples, alone, how: str, use_cache: bool | None) -> float:
    batch = pack_multimodal(samples, flash_attn_kwargs=how == "cu")
    batch.pop("labels")
    text = batch.pop("position_ids")
    if how in ("3-row", "4-row"):
        rows = rotary_rows(model, samples)
        if rows is None:
            return math.nan
        batch["position_ids"] = rows if how == "3-row" else torch.cat([text[None], rows])
    elif how == "2-D":
        batch["position_ids"] = text
    if use_cache is not None:
        batch["use_cache"] = use_cache
    try:
        with torch.no_grad():
            logits = model(**inputs_on_model(model, batch)).logits[0]
    except Exception as err:  # upstream (or a refusal) raising is a result too
        return f"{type(err).__name__}"
    pieces = logits.split([s["input_ids"].shape[1] for s in samples])
    return max(float((p.float() - a).abs().max()) for p, a in zip(pieces, alone))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_types", nargs="*")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    types = args.model_types or sorted({mt for mt, _ in registered_variants(multimodal=True)})
    rows = []
    header = (
        f"{'model_type':14s} {'positions':9s} {'upstream(no cache)':>20s} {'upstream(default)':>18s} {'patched':>9s}"
    )
    print(header)
    for model_type in types:
        model = tiny_model(model_type, attn_implementation="sdpa").eval()
        samples = multimodal_samples(model, multimodal_layouts(model_type), seed=1)
        alone = _run_samples(model, samples, grads=False).logits
        results = {
            how: [packed_error(model, samples, alone, how, cache) for cache in (False, None)]  # no cache, default
            for how in ("2-D", "3-row", "4-row", "cu")
        }
        hf_varlen_patch.apply(model, backend="sdpa")
        for how, found in results.items():
            patched = packed_error(model, samples, alone, how, None)
            if all(isinstance(x, float) and math.isnan(x) for x in found):
                continue
            row = dict(model_type=model_type, positions=how, upstream_no_cache=found[0], upstream_default=found[1],
                       patched=patched)  # fmt: skip
            rows.append(row)

            def cell(x, width):
                return f"{x:>{width}.1e}" if isinstance(x, float) else f"{x:>{width}s}"

            print(f"{model_type:14s} {how:9s} {cell(found[0], 20)} {cell(found[1], 18)} {cell(patched, 9)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
