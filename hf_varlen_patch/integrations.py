"""Guards where another library would silently unpack a packed batch before the model sees it.

PEFT's prompt-learning methods (prompt tuning, p-tuning, prefix tuning, ...) prepend virtual
tokens to every *row* and drop (or shift) ``position_ids``: on a packed row only the first sequence
would get the prompt, and the model would run the row unpacked, with no error. Those wrappers
are refused: at ``apply`` when the model is already wrapped, and, when ``apply`` came first, at
the wrapper's packed call (a guard on PEFT's prompt-learning kwargs adjustment, installed once
per process; it changes nothing for models this library did not patch).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch

from .errors import PackedCallError, UnsupportedArchitectureError

__all__ = ["refuse_prompt_learning", "guard_prompt_learning"]

_PROMPT_LEARNING = (
    "PEFT {method} prepends virtual tokens to every row and drops or shifts position_ids, so a packed row "
    "would run unpacked with one prompt for all its sequences. Use a PEFT method that changes weights "
    "(LoRA, IA3, ...), or train prompt learning on padded batches (one sequence per row)."
)


def _method(peft_config: Any) -> str:
    kind = getattr(peft_config, "peft_type", None)
    return str(getattr(kind, "value", kind) or "prompt learning").lower().replace("_", " ")


def refuse_prompt_learning(wrappers: list[Any]) -> None:
    """Raise if one of ``wrappers`` (the objects between the user's model and the transformers
    model) is a PEFT model whose active adapter is prompt learning."""
    for wrapper in wrappers:
        config = getattr(wrapper, "active_peft_config", None)
        if config is not None and getattr(config, "is_prompt_learning", False):
            raise UnsupportedArchitectureError(_PROMPT_LEARNING.format(method=_method(config)))


def _is_packed_call(kwargs: dict) -> bool:
    if any(kwargs.get(k) is not None for k in ("cu_seq_lens_q", "cu_seq_lens_k")):
        return True
    positions = kwargs.get("position_ids")
    if not isinstance(positions, torch.Tensor) or positions.ndim < 1 or positions.shape[-1] < 2:
        return False
    return bool((positions[..., 1:] != positions[..., :-1] + 1).any())


def guard_prompt_learning() -> None:
    """Make PEFT's prompt-learning forwards refuse packed calls to a patched model (once; only if
    PEFT is already imported, as it is wherever a model gets wrapped by it)."""
    peft_model = sys.modules.get("peft.peft_model")
    cls = getattr(peft_model, "PeftModel", None)
    adjust = getattr(cls, "_adjust_prompt_learning_kwargs", None)
    if adjust is None or getattr(adjust, "hf_varlen_guard", False):
        return

    @functools.wraps(adjust)
    def guarded(self: Any, peft_config: Any, *args: Any, **kwargs: Any) -> Any:
        call = kwargs.get("kwargs", args[0] if args else {})
        if isinstance(call, dict) and _is_packed_call(call) and _patched_below(self):
            raise PackedCallError(_PROMPT_LEARNING.format(method=_method(peft_config)))
        return adjust(self, peft_config, *args, **kwargs)

    guarded.hf_varlen_guard = True
    cls._adjust_prompt_learning_kwargs = guarded


def _patched_below(wrapper: Any) -> bool:
    from .install import find_hf_model, is_patched

    try:
        return is_patched(find_hf_model(wrapper))
    except Exception:
        return False
