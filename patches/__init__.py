"""Per-architecture entries of the hf_varlen_patch registry, one module per family.

Importing this package imports every module in it (except ``_private`` ones), which registers
its entries. Installed as ``hf_varlen_patch.patches``.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
