"""The refusal shared by every entry with rotary positions: scalings whose frequencies depend on
the length of the whole input give each packed sequence other frequencies than it gets alone."""

from __future__ import annotations

from typing import Any

#: Rotary scalings that pick their frequencies from the input's length (``max(position_ids) + 1``,
#: or the row length): a packed row would give every sequence the longest one's frequencies.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_types(config: Any) -> set[str]:
    """The rotary types ``config`` uses (``rope_scaling`` on 4.57, ``rope_parameters`` on 5.x,
    also per layer type)."""
    found = set()
    for name in ("rope_scaling", "rope_parameters"):
        params = getattr(config, name, None)
        if not isinstance(params, dict):
            continue
        nested = [p for p in params.values() if isinstance(p, dict)]
        for p in nested or [params]:
            rope_type = p.get("rope_type", p.get("type"))
            if rope_type:
                found.add(rope_type)
    return found


def refuse_length_dependent_rope(config: Any, allowed: tuple[str, ...] = ()) -> str | None:
    """A refusal reason when ``config`` uses a length-dependent rotary scaling not in ``allowed``."""
    bad = sorted((rope_types(config) & set(LENGTH_DEPENDENT_ROPE)) - set(allowed))
    if bad:
        return (
            f"rope type {bad[0]!r} derives its frequencies from the length of the whole input, so a "
            "packed row would give each sequence other frequencies than it gets alone; use a static "
            "rotary scaling (default, linear, yarn, llama3) for packed training."
        )
    return None
