"""Vision-language models: samples with 0, 1 and 2 images (and a video for the Qwen-VL family)
packed in one row == each sample alone, logits and every gradient (vision tower included), with
boundaries from restarting 2-D position_ids, from cu_seq_lens, and from mRoPE rows."""

import copy

import pytest
import torch
import transformers
from hf_varlen_patch.patches.multimodal import MROPE

import hf_varlen_patch
from hf_varlen_patch import MalformedBoundariesError, UnsupportedArchitectureError, VarlenPatchError
from hf_varlen_patch.boundaries import Boundaries, text_positions
from hf_varlen_patch.packing import pack_multimodal
from hf_varlen_patch.testing import (
    compare_multimodal,
    multimodal_layouts,
    multimodal_samples,
    registered_variants,
    tiny_model,
)

TOL = 1e-5
SUPPORTED = sorted({mt for mt, _ in registered_variants(multimodal=True)})
REFUSED = sorted({mt for mt, _ in registered_variants(multimodal=True, refused=True)})


def _samples(model, model_type):
    return multimodal_samples(model, multimodal_layouts(model_type), seed=1)


def test_the_issue_types_are_covered_or_refused():
    for model_type in ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "idefics3", "smolvlm", "mistral3", "internvl"):
        if model_type in transformers.CONFIG_MAPPING:
            assert model_type in SUPPORTED, model_type
    if not transformers.__version__.startswith("4."):
        assert {"qwen3_vl", "qwen3_vl_moe", "qwen3_5", "glm4v", "gemma3", "paligemma", "mllama"} <= set(SUPPORTED)
    assert set(REFUSED) <= {"llama4", "qwen3_vl", "qwen3_vl_moe", "glm4v", "gemma3", "paligemma", "mllama"}


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_packed_samples_match_each_sample_alone(model_type):
    model = tiny_model(model_type, attn_implementation="sdpa")
    samples = _samples(model, model_type)
    if model_type not in hf_varlen_patch.lookup(model_type).multimodal.text_only:
        assert any("pixel_values" in s for s in samples) and any("pixel_values" not in s for s in samples)
    # the check sees a leak: upstream with its default cache, or with the collator's cu_seq_lens
    upstream = []
    for lay in ("positions", "cu"):
        try:
            upstream.append(compare_multimodal(model, samples, grads=False, use_cache=None, layout=lay).logits)
        except ValueError:  # upstream refuses cu_seq_lens without flash kernels (Qwen3.5): loud, not a leak
            pass
    assert max(upstream) > 1e-2, upstream
    if model_type in MROPE:  # and for mRoPE models even without a cache: positions go on across samples
        assert compare_multimodal(model, samples, grads=False).logits > 1e-2
    hf_varlen_patch.apply(model)
    for layout in ("positions", "cu"):
        for use_cache in (False, None):
            result = compare_multimodal(model, samples, layout=layout, use_cache=use_cache)
            assert result.ok(TOL), (layout, use_cache, result)
    assert any(name.startswith(("model.visual", "model.vision_tower", "model.vision_model")) for name, _ in
               model.named_parameters())  # fmt: skip


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_the_vision_tower_keeps_upstream_attention_and_unapply_restores(model_type):
    model = tiny_model(model_type, attn_implementation="sdpa")
    vision = model.config.vision_config._attn_implementation
    text = model.config.get_text_config()._attn_implementation
    samples = _samples(model, model_type)
    before = compare_multimodal(model, samples, grads=False)
    hf_varlen_patch.apply(model)
    assert model.config.vision_config._attn_implementation == vision
    assert model.config.get_text_config()._attn_implementation.startswith("hf_varlen")
    copied = copy.deepcopy(model)  # EMA / reference models: a copy patched the same way
    assert hf_varlen_patch.is_patched(copied) and compare_multimodal(copied, samples).ok(TOL)
    hf_varlen_patch.unapply(model)
    assert model.config.get_text_config()._attn_implementation == text
    assert compare_multimodal(model, samples, grads=False) == before


def _mrope_model():
    model_type = "qwen2_5_vl"
    model = tiny_model(model_type, attn_implementation="sdpa")
    return model, _samples(model, model_type)


def _alone_rotary_rows(model, samples):
    """Each sample's own (3, 1, n) rotary positions, concatenated: what a careful collator sends."""
    import inspect

    params = inspect.signature(model.model.get_rope_index).parameters
    rows = []
    for s in samples:
        kwargs = {k: s[k] for k in ("image_grid_thw", "video_grid_thw", "mm_token_type_ids") if k in s and k in params}
        rows.append(model.model.get_rope_index(s["input_ids"], attention_mask=torch.ones_like(s["input_ids"]),
                                               **kwargs)[0])  # fmt: skip
    return torch.cat(rows, dim=-1)


@pytest.mark.skipif("qwen2_5_vl" not in SUPPORTED, reason="qwen2_5_vl is not in this transformers release")
def test_rotary_rows_from_the_caller_are_used_when_right_and_refused_when_wrong():
    model, samples = _mrope_model()
    hf_varlen_patch.apply(model)
    packed = pack_multimodal(samples, flash_attn_kwargs=False)
    packed.pop("labels")
    reference = model(**packed, use_cache=False).logits
    rotary = _alone_rotary_rows(model, samples)
    text = packed["position_ids"]
    for given in (rotary, torch.cat([text[None], rotary])):  # 3 rows (boundaries from their restarts) or 4
        out = model(**{**packed, "position_ids": given}, use_cache=False).logits
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    # rows computed over the whole packed row (the second sample's positions go on from the first's)
    whole = model.model.get_rope_index(packed["input_ids"], attention_mask=torch.ones_like(packed["input_ids"]),
                                       **{k: packed[k] for k in ("image_grid_thw", "video_grid_thw",
                                          "mm_token_type_ids") if k in packed})[0]  # fmt: skip
    with pytest.raises(MalformedBoundariesError, match="each sample gets alone"):
        model(**{**packed, "position_ids": torch.cat([text[None], whole])}, use_cache=False)


@pytest.mark.skipif("qwen2_5_vl" not in SUPPORTED, reason="qwen2_5_vl is not in this transformers release")
def test_images_without_input_ids_need_rotary_rows():
    model, samples = _mrope_model()
    hf_varlen_patch.apply(model)
    packed = pack_multimodal(samples)
    packed.pop("labels")
    embeds = model.get_input_embeddings()(packed.pop("input_ids"))
    with pytest.raises(VarlenPatchError, match="needs input_ids"):
        model(inputs_embeds=embeds, **packed, use_cache=False)


def test_text_positions_of_rotary_rows():
    # sample A: text, then a video whose text after it resumes below its last frame's temporal
    # position; sample B: one token; sample C starts with an image at (0, 0, 0), (0, 0, 1), ...
    t = torch.tensor([[0, 4, 2, 0, 0, 0, 0, 0, 1]])
    h = torch.tensor([[0, 1, 2, 0, 0, 0, 1, 1, 2]])
    w = torch.tensor([[0, 1, 2, 0, 0, 1, 0, 1, 2]])
    rows = torch.stack([t, h, w])
    positions = text_positions(rows)
    starts = Boundaries.from_position_ids(positions).cu_seqlens.tolist()
    assert starts == [0, 3, 4, 9]
    four = torch.cat([torch.tensor([[[0, 1, 2, 0, 0, 1, 2, 3, 4]]]), rows])
    assert Boundaries.from_position_ids(four).cu_seqlens.tolist() == [0, 3, 4, 9]
    with pytest.raises(MalformedBoundariesError, match="mRoPE"):
        text_positions(torch.zeros(2, 1, 9, dtype=torch.long))


def test_pack_multimodal_lays_samples_out_in_one_row():
    a = {"input_ids": torch.tensor([[1, 2, 9, 9, 3]]), "pixel_values": torch.ones(1, 2, 3, 4, 4),
         "image_sizes": torch.tensor([[4, 4]])}  # fmt: skip
    b = {"input_ids": torch.tensor([[4, 5]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    c = {"input_ids": torch.tensor([[9, 6, 7]]), "pixel_values": torch.ones(1, 3, 3, 4, 4),
         "image_sizes": torch.tensor([[4, 8]])}  # fmt: skip
    batch = pack_multimodal([a, b, c])
    assert batch["input_ids"].tolist() == [[1, 2, 9, 9, 3, 4, 5, 9, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 2, 9, 9, 3, -100, 5, -100, 6, 7]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 7, 10] and batch["max_length_k"] == 5
    assert batch["pixel_values"].shape == (2, 3, 3, 4, 4)  # patches zero-padded to the largest
    assert batch["pixel_values"][0, 2].abs().sum() == 0 and batch["pixel_values"][1, 2].abs().sum() > 0
    assert batch["image_sizes"].tolist() == [[4, 4], [4, 8]]
    assert "attention_mask" not in batch
    with pytest.raises(ValueError, match="padding"):
        pack_multimodal([a, {"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[1, 0]])}])
    with pytest.raises(ValueError, match=r"\(1, n\)"):
        pack_multimodal([{"input_ids": torch.tensor([1, 2])}])
    with pytest.raises(ValueError, match="some samples"):
        pack_multimodal([{**b, "mm_token_type_ids": torch.zeros(1, 2, dtype=torch.long)}, a])


@pytest.mark.skipif(transformers.__version__.startswith("4."), reason="gemma3 and paligemma are refused on 4.57")
@pytest.mark.parametrize("model_type", ["gemma3", "paligemma"])
def test_bidirectional_blocks_are_kept_per_sample(model_type, monkeypatch):
    """Gemma 3's images and PaliGemma's prefix attend both ways: without the blocks the check fails."""
    import hf_varlen_patch.patches.multimodal as multimodal

    model = tiny_model(model_type, attn_implementation="sdpa")
    samples = multimodal_samples(model, [[3, "image", 4], [5, 6], [2, "image", 1, "image", 3]], seed=2)
    assert all("token_type_ids" in s for s in samples)
    hf_varlen_patch.apply(model)
    assert compare_multimodal(model, samples).ok(TOL)
    hf_varlen_patch.unapply(model)
    monkeypatch.setattr(multimodal, "BLOCKS", {})  # the same entry, blind to the blocks
    hf_varlen_patch.apply(model)
    assert compare_multimodal(model, samples, grads=False).logits > 1e-3


@pytest.mark.skipif(transformers.__version__.startswith("4."), reason="paligemma is refused on 4.57")
def test_paligemma_needs_token_type_ids_and_mllama_text_only_rows():
    model = tiny_model("paligemma", attn_implementation="sdpa")
    samples = multimodal_samples(model, [[3, 4], [5, 6]], seed=1)
    for s in samples:
        s.pop("token_type_ids")
    hf_varlen_patch.apply(model)
    with pytest.raises(VarlenPatchError, match="need token_type_ids"):
        compare_multimodal(model, samples)
    mllama = tiny_model("mllama", attn_implementation="sdpa")
    hf_varlen_patch.apply(mllama)
    packed = pack_multimodal(multimodal_samples(mllama, [[4], [5]]))
    with pytest.raises(VarlenPatchError, match="cross-attention"):
        mllama(**packed, pixel_values=torch.zeros(1, 1, 1, 3, 8, 8), use_cache=False)


@pytest.mark.parametrize("model_type", REFUSED)
def test_refused_vlms_say_why(model_type):
    config = hf_varlen_patch.testing.tiny_config(model_type)
    reason = hf_varlen_patch.lookup(model_type).refusal(config)
    assert reason
    try:
        model = transformers.AutoModelForImageTextToText.from_config(config)
    except Exception:  # mllama's default config does not build on 4.57: the reason stands on its own
        return
    with pytest.raises(UnsupportedArchitectureError, match="cannot patch this") as err:
        hf_varlen_patch.apply(model)
    assert reason in str(err.value)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_samples_are_counted_where_the_model_is_and_stay_on_the_host(model_type, monkeypatch):
    """The sample builder counts placeholders with the model's own feature functions: they get the
    vision inputs on the model's device and in its dtype (a bf16 twin stands in for a GPU one
    here: upstream casts pixels itself in some models, never moves them), while the samples stay
    float32 on the host, as a processor's are."""
    model = tiny_model(model_type, attn_implementation="sdpa").to(torch.bfloat16)
    seen = []
    for name in ("get_image_features", "get_video_features"):
        function = getattr(type(model.base_model), name, None)
        if function is not None:

            def recording(self, pixels, *args, _function=function, **kwargs):
                seen.append(pixels.dtype)
                return _function(self, pixels, *args, **kwargs)

            monkeypatch.setattr(type(model.base_model), name, recording)
    samples = _samples(model, model_type)
    assert seen or model_type in hf_varlen_patch.lookup(model_type).multimodal.text_only
    assert set(seen) <= {torch.bfloat16}, seen
    tensors = [v for s in samples for v in s.values() if isinstance(v, torch.Tensor)]
    assert all(t.device.type == "cpu" for t in tensors)
    assert {t.dtype for t in tensors if t.is_floating_point()} <= {torch.float32}
    fp32_samples = _samples(tiny_model(model_type, attn_implementation="sdpa"), model_type)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(samples, fp32_samples))
