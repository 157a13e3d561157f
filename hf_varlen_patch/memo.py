"""A memo that torch.compile traces without a warning.

dynamo warns at every ``functools.cache``/``lru_cache`` call it traces (it cannot see the cache);
the lookups the backends and kernels make from inside a forward (is this kernel installed, what
does its signature take) are memoised here instead: a plain dict keyed by the arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def computed_once(fn: F) -> F:
    """``fn`` memoised by its (hashable) positional arguments; ``.cache_clear()`` forgets."""
    results: dict[tuple, Any] = {}

    @functools.wraps(fn)
    def memoised(*args: Any) -> Any:
        if args not in results:
            results[args] = fn(*args)
        return results[args]

    memoised.cache_clear = results.clear  # type: ignore[attr-defined]
    return memoised  # type: ignore[return-value]
