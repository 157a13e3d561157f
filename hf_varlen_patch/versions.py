"""Which transformers and torch releases the engine supports."""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version

from .errors import UnsupportedVersionError

#: (major, minor) pairs; a whole major is written (major, None).
SUPPORTED_TRANSFORMERS = ((4, 57), (5, None))
MIN_TORCH = Version("2.5")
#: The oldest and newest transformers releases CI runs every registered entry on. A release
#: between them (say 5.17) is covered; one outside gets a one-line warning.
TESTED_RANGE = (Version("4.57.6"), Version("5.25.0"))


def transformers_version() -> Version:
    return Version(transformers.__version__)


#: The installed transformers is a 4.x release (4.57): legacy attention classes, older names.
#: For patches that branch on the line; refusals per release are declared in ``ReleaseRefusal``.
TRANSFORMERS_4 = transformers_version().major == 4


def check_versions() -> None:
    """Raise :class:`UnsupportedVersionError` outside the supported range, naming the fix."""
    tv = transformers_version()
    ok = any(tv.major == major and (minor is None or tv.minor == minor) for major, minor in SUPPORTED_TRANSFORMERS)
    if not ok:
        raise UnsupportedVersionError(
            f"transformers {transformers.__version__} is not supported; hf_varlen_patch supports "
            "transformers 4.57.x and 5.x. Install one of them (pip install 'transformers>=5,<6')."
        )
    if Version(torch.__version__.split("+")[0]) < MIN_TORCH:
        raise UnsupportedVersionError(
            f"torch {torch.__version__} is too old; hf_varlen_patch needs torch >= {MIN_TORCH}."
        )


def is_tested(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed transformers) lies in :data:`TESTED_RANGE`."""
    release = Version(Version(version or transformers.__version__).base_version)
    low, high = TESTED_RANGE
    return low <= release <= high


def tested_range_text() -> str:
    low, high = TESTED_RANGE
    return f"{low} to {high}"
