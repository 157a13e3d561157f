"""Per-architecture entries of the hf_varlen_patch registry, one module per family.

Importing this package registers every entry. Installed as ``hf_varlen_patch.patches``.
"""

from . import gemma, gpt2, gpt_neox, llama, qwen2_moe  # noqa: F401
