"""Self-check: decide on a tiny twin of the user's own config whether a patch makes it exact.

For a model_type without a registry entry, `apply` builds a twin (same classes and flags,
shrunk), patches it through the generic route, and compares packed with separate runs in float32
on the CPU (logits, loss, gradients; a second or a few). Only a pass lets `apply` patch the real
model. Verdicts are cached per (model_type, transformers version, config fingerprint, code
digest), in memory and in ``$HF_VARLEN_PATCH_CACHE`` (default
``~/.cache/hf_varlen_patch/self_check.json``). The code digest hashes the code of every class
the twin is built from (the model, its modules, the config and their bases: their functions'
bytecode and the files that define them), the engine's sources and the torch and transformers
versions, so a changed modeling file is checked again.

What a twin can miss (and the guards):
- Sizes: behaviour that only appears at real widths or lengths (numerics of bf16 at scale,
  kernels chosen by size). Every config value that may count tokens (a window, chunk, block,
  span, budget, ... under any key, in sub-configs and per-layer lists:
  :func:`~hf_varlen_patch.twins.length_values`) is crossed: the twin shrinks the known ones below
  the test lengths, and the check adds sequences longer than the others, up to
  ``MAX_CHECK_LENGTH`` tokens; a longer one that the model can reach is refused, naming the key.
  Rotary scalings that depend on the input length are refused outright.
- Flags the shrink had to change: :func:`~hf_varlen_patch.twins.dropped_flags` lists them and
  the check fails rather than vouch for a different model.
- Code the twin never runs: remote code that branches on sizes, or attention that bypasses the
  AttentionInterface only in some layers. The check requires that packed attention actually ran.
"""

from __future__ import annotations

import hashlib
import json
import logging
import marshal
import math
import os
import sys
import weakref
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .equivalence import LAYOUTS, build_twin, float32_twin, worst_over_layouts
from .errors import VarlenPatchError
from .twins import (
    MAX_POSITIONS,
    TwinError,
    config_fingerprint,
    dropped_flags,
    length_values,
    position_capacity,
    tiny_config,
)

__all__ = ["SelfCheck", "self_check", "cache_path", "check_layouts", "code_digest", "GENERIC_FAMILY"]

logger = logging.getLogger("hf_varlen_patch")
GENERIC_FAMILY = "self-check"
#: The longest sequence the check runs to cross a length-like config value (a tiny twin runs
#: packed and separate at this length in about a second).
MAX_CHECK_LENGTH = min(1024, MAX_POSITIONS)
_MEMORY: dict[str, SelfCheck] = {}


@dataclass(frozen=True)
class SelfCheck:
    """The verdict of one self-check: ``passed`` and the largest packed-vs-separate error;
    ``code`` is the :func:`code_digest` of what it ran."""

    model_type: str
    transformers_version: str
    fingerprint: str
    passed: bool
    error: float
    reason: str = ""
    code: str = ""

    def key(self) -> str:
        return f"{self.model_type}|{self.transformers_version}|{self.fingerprint}|{self.code}"


def cache_path() -> Path:
    root = os.environ.get("HF_VARLEN_PATCH_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "hf_varlen_patch"
    return base / "self_check.json"


def _load_disk() -> dict[str, dict]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store(result: SelfCheck) -> None:
    _MEMORY[result.key()] = result
    try:
        path = cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_disk()
        data[result.key()] = asdict(result)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as err:  # a read-only home is no reason to fail the check
        logger.debug("hf_varlen_patch: could not write the self-check cache: %s", err)


def _cached(key: str) -> SelfCheck | None:
    if key in _MEMORY:
        return _MEMORY[key]
    found = _load_disk().get(key)
    if found is None:
        return None
    try:
        result = SelfCheck(**found)
    except TypeError:
        return None
    _MEMORY[key] = result
    return result


def self_check(
    config: Any,
    *,
    entry: Any = None,
    model_class: type | None = None,
    tol: float = 1e-5,
    use_cache: bool = True,
) -> SelfCheck:
    """Check packed == separate on a tiny twin of ``config`` patched with ``entry`` (default: the
    generic route). ``model_class`` builds the twin (default: the AutoModelForCausalLM class)."""
    import transformers

    from .registry import PatchEntry

    model_type = config.model_type
    version = transformers.__version__
    fingerprint = config_fingerprint(config)
    if entry is None:
        entry = PatchEntry(family=GENERIC_FAMILY, model_types=(model_type,))
    try:
        twin = _twin(config)
        layouts, crossed = check_layouts(config, twin)
        code = code_digest(_classes_of(twin, model_class), entry)
    except (TwinError, VarlenPatchError) as err:  # nothing to run: a verdict as cheap to redo as to cache
        return SelfCheck(model_type, version, fingerprint, False, math.nan, str(err))
    except Exception as err:
        reason = f"the tiny twin failed: {type(err).__name__}: {err}"[:300]
        return SelfCheck(model_type, version, fingerprint, False, math.nan, reason)
    key = SelfCheck(model_type, version, fingerprint, False, math.nan, code=code).key()
    if use_cache:
        found = _cached(key)
        if found is not None:
            return found
    try:
        error, reason = _run(twin, entry, model_class, layouts)
    except (TwinError, VarlenPatchError) as err:
        error, reason = math.nan, str(err)
    except Exception as err:  # the twin itself does not run: no verdict to trust
        error, reason = math.nan, f"the tiny twin failed: {type(err).__name__}: {err}"[:300]
    passed = not reason and math.isfinite(error) and error <= tol
    if not passed and not reason:
        reason = f"packed and separate runs of the tiny twin differ by {error:.1e} (tolerance {tol:g})"
        if crossed:
            reason += f", with sequences long enough to cross {crossed}"
    result = SelfCheck(model_type, version, fingerprint, passed, error, reason, code)
    _store(result)
    return result


def _twin(config: Any) -> Any:
    """The twin the check runs (the CPU twin keeps eager or sdpa; a kernel that needs a GPU is
    checked as sdpa, the reference its packed route is compared with)."""
    twin = tiny_config(config)
    changed = dropped_flags(config, twin)
    if changed:
        names = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in list(changed.items())[:4])
        raise TwinError(f"the tiny twin had to change flags that may matter: {names}")
    original = getattr(config, "_attn_implementation", None)
    twin._attn_implementation = original if original in ("eager", "sdpa") else "sdpa"
    return twin


def check_layouts(config: Any, twin: Any | None = None) -> tuple[tuple[dict, ...], str]:
    """The packed layouts that check ``twin`` (default: the tiny twin of ``config``), and the
    length-like values that needed long sequences (``"key = value, ..."``, empty when none).

    :data:`LAYOUTS` cross every value below their longest sequence; for a longer one (a window,
    chunk, block, ... that the twin keeps: :func:`~hf_varlen_patch.twins.length_values`) two
    layouts add sequences longer than it, one after a short sequence (a window or chunk counted
    from the row's start instead of the sequence's shows) and one at a row start beside padding.
    Values that no sequence of ``config`` can reach (at or past its position capacity, when that
    is below the twin's) are skipped. Raises :class:`~hf_varlen_patch.twins.TwinError`, naming
    the key, for one that needs more than :data:`MAX_CHECK_LENGTH` tokens.
    """
    twin = tiny_config(config) if twin is None else twin
    longest = max(n for layout in LAYOUTS for row in layout["rows"] for n in row)
    capacity = position_capacity(config)
    if capacity is None or capacity >= MAX_POSITIONS:
        capacity = None  # no bound, or one the twin may have shrunk: every value can bite
    uncrossed = [(path, v) for path, v in length_values(twin) if v + 2 > longest]
    reachable = [(path, v) for path, v in uncrossed if capacity is None or v + 2 <= capacity]
    if not reachable:
        return LAYOUTS, ""
    path, value = max(reachable, key=lambda item: item[1])
    if value + 2 > MAX_CHECK_LENGTH:
        top = "." not in path
        fix = (
            f"hf_varlen_patch.registry.register_twin_overrides([{config.model_type!r}], {{{path!r}: 8}})"
            if top
            else "hf_varlen_patch.registry.register_twin_overrides with a smaller value for it"
        )
        raise TwinError(
            f"the self-check cannot exercise {path} = {value}: a value that may count tokens needs sequences "
            f"longer than it, and the check runs at most {MAX_CHECK_LENGTH} tokens. If it is a length the "
            f"model handles the same way at any size, shrink it for the check with {fix}; otherwise the "
            "model needs a registry entry"
        )
    n = value + 2
    long = (
        dict(rows=[[7, n, 5]], seed=2),
        dict(rows=[[n, 3], [4, n]], extra_padding=2, seed=3),
    )
    crossed = ", ".join(f"{p} = {v}" for p, v in sorted(set(reachable)))
    return LAYOUTS + long, crossed


def _classes_of(twin: Any, model_class: type | None) -> set[type]:
    """The classes a check of ``twin`` runs: the model's and its modules' (built on the meta
    device, no memory), the config's, and the model class asked for."""
    classes: set[type] = {type(twin)}
    if model_class is not None:
        classes.add(model_class)
    try:
        with torch.device("meta"):
            model = build_twin(twin, model_class=model_class, seed=None, long_lived=False)
    except Exception as err:  # the check will fail on the same error; its verdict names it
        logger.debug("hf_varlen_patch: the twin does not build on the meta device: %s", err)
        return classes
    return classes | {type(m) for m in model.modules()}


_CLASS_HASHES: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()
_FILE_HASHES: dict[tuple[str, int, int], str] = {}
_ENGINE_HASH: list[str] = []


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _tracked(cls: type) -> bool:
    """Classes whose code can change under a cached verdict (torch and the standard library are
    keyed by version instead)."""
    top = cls.__module__.split(".")[0]
    return top != "torch" and top not in sys.stdlib_module_names


def _class_hash(cls: type) -> str:
    """The hash of a class's functions' bytecode (its file's hash covers the rest of its source):
    a class redefined with other code in the same file hashes differently."""
    found = _CLASS_HASHES.get(cls)
    if found is None:
        parts = []
        for name, attr in sorted(vars(cls).items()):
            fn = attr.fget if isinstance(attr, property) else getattr(attr, "__func__", attr)
            code = getattr(fn, "__code__", None)
            parts.append(name.encode() + (marshal.dumps(code) if code is not None else b""))
        found = _CLASS_HASHES[cls] = _sha(b"\0".join(parts))
    return found


def _file_hash(path: str | None) -> str:
    """The hash of a source file (module-level functions too), once per version of the file."""
    if not path:
        return "-"
    try:
        stat = os.stat(path)
    except OSError:
        return "-"
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _FILE_HASHES:
        try:
            _FILE_HASHES[key] = _sha(Path(path).read_bytes())
        except OSError:
            return "-"
    return _FILE_HASHES[key]


def _engine_hash() -> str:
    """hf_varlen_patch's version and sources, with the per-family patches (once per process)."""
    if not _ENGINE_HASH:
        from . import __version__
        from . import patches as patches_package

        roots = [Path(__file__).parent, *map(Path, patches_package.__path__)]
        files = sorted({p for root in roots for p in root.rglob("*.py")})
        parts = [__version__.encode()] + [p.name.encode() + p.read_bytes() for p in files]
        _ENGINE_HASH.append(_sha(b"\0".join(parts)))
    return _ENGINE_HASH[0]


def code_digest(classes: Iterable[type], entry: Any = None) -> str:
    """A hash of the code a self-check runs: every class of ``classes`` and its bases (their
    functions' bytecode), the files that define them, the engine, ``entry``'s family, and the
    torch and transformers versions. A verdict cached under one digest is not reused for changed
    code; each class and file is hashed once per process (a file again when it changes)."""
    import transformers

    tracked = {base for cls in classes for base in cls.__mro__ if _tracked(base)}

    def names(cls: type) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    parts = [
        f"engine {_engine_hash()}",
        f"entry {getattr(entry, 'family', None)}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
    ]
    parts += [f"{names(cls)} {_class_hash(cls)}" for cls in sorted(tracked, key=names)]
    for module in sorted({cls.__module__ for cls in tracked}):
        parts.append(f"{module} {_file_hash(getattr(sys.modules.get(module), '__file__', None))}")
    return _sha("\n".join(parts).encode())


def _run(twin: Any, entry: Any, model_class: type | None, layouts: Iterable[dict]) -> tuple[float, str]:
    from .attention import BACKEND_USAGE
    from .install import apply_entry

    with torch.device("cpu"):
        model = float32_twin(twin, model_class=model_class)  # long-lived recurrent state, so a leak shows
    apply_entry(model, entry, backend="sdpa")
    BACKEND_USAGE.clear()
    worst = worst_over_layouts(model, layouts, shifts_labels=entry.shifts_labels)  # patched: takes position_ids
    if not BACKEND_USAGE:
        return math.nan, "the packed forward never reached the registered attention function"
    return worst.max_error, ""
