"""The parity table of docs/preference_rl.md: TRL's trainers with ``apply(model, unpad=True)``
against their reference runs, on the transformers release installed here.

Each cell is the largest parameter difference after three SGD steps in float32 on the CPU (the
runs of ``tests/test_preference_rl.py`` and ``tests/test_rl_trainers.py``, whose checks hold every
cell to 1e-6). DPO, reward and KTO pad on the right, so their reference is the unpatched run;
GRPO left-pads its prompts, so its reference is each sequence alone (the tests' oracle), and the
unpatched run's own distance to that oracle is shown beside it.

    python scripts/preference_rl_parity.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("WANDB_DISABLED", "true")


def main() -> None:
    warnings.filterwarnings("ignore")
    with contextlib.redirect_stdout(io.StringIO()):  # the trainers' logs
        rows, images = measure()
    import transformers
    from test_preference_rl import TEXT_TYPES
    from trl import __version__ as trl_version

    print(f"transformers {transformers.__version__}, TRL {trl_version}; max parameter difference after 3 SGD steps\n")
    print("| trainer (reference) | " + " | ".join(TEXT_TYPES) + " |")
    print("| --- |" + " --- |" * len(TEXT_TYPES))
    for name, cells in rows:
        print(f"| {name} | " + " | ".join(cells[mt] for mt in TEXT_TYPES) + " |")
    print("\n| llava (images), vs unpatched | max difference |\n| --- | --- |")
    for name, value in images.items():
        print(f"| {name} | {value} |")


def measure() -> tuple[list[tuple[str, dict[str, str]]], dict[str, str]]:
    import test_preference_rl as prefs
    import test_rl_trainers as rl
    from test_preference_rl import TEXT_TYPES, max_diff, patched

    from hf_varlen_patch.testing import tiny_model

    tmp = tempfile.mkdtemp()
    rows: list[tuple[str, dict[str, str]]] = []

    def cell(reference: dict, packed: dict) -> str:
        return f"{max_diff(reference, packed):.1e}"

    for ref in prefs.DPO_REFERENCES:
        rows.append(
            (
                f"DPO ({ref}) vs unpatched",
                {mt: cell(prefs.dpo_run(mt, ref, tmp), prefs.dpo_run(mt, ref, tmp, wrap=patched)) for mt in TEXT_TYPES},
            )
        )
    for name, peft in (("full", lambda: None), ("LoRA", lambda: prefs.lora_config("SEQ_CLS"))):
        rows.append(
            (
                f"Reward ({name}) vs unpatched",
                {
                    mt: cell(
                        prefs.reward(prefs.reward_model(mt), tmp, peft=peft()),
                        prefs.reward(patched(prefs.reward_model(mt)), tmp, peft=peft()),
                    )
                    for mt in TEXT_TYPES
                },
            )
        )
    for ref in ("ref_model", "lora"):
        rows.append(
            (
                f"KTO ({ref}) vs unpatched",
                {mt: cell(rl.kto_run(mt, ref, tmp), rl.kto_run(mt, ref, tmp, wrap=patched)) for mt in TEXT_TYPES},
            )
        )
    grpo_packed, grpo_upstream = {}, {}
    for mt in TEXT_TYPES:
        alone = rl.grpo(rl.each_sequence_alone(rl.policy(mt)), tmp)[0]
        grpo_packed[mt] = cell(alone, rl.grpo(patched(rl.policy(mt)), tmp)[0])
        grpo_upstream[mt] = cell(alone, rl.grpo(rl.policy(mt), tmp)[0])
    rows.append(("GRPO (beta 0) vs each sequence alone", grpo_packed))
    rows.append(("GRPO: the *unpatched* run vs each sequence alone", grpo_upstream))
    images = {
        "DPO (ref_model)": cell(
            prefs.dpo_vision(tiny_model("llava"), tmp, ref_model=tiny_model("llava")),
            prefs.dpo_vision(patched(tiny_model("llava")), tmp, ref_model=patched(tiny_model("llava"))),
        ),
        "DPO (lora)": cell(
            prefs.dpo_vision(tiny_model("llava"), tmp, peft=prefs.lora_config()),
            prefs.dpo_vision(patched(tiny_model("llava")), tmp, peft=prefs.lora_config()),
        ),
        "GRPO (beta 0)": cell(
            rl.grpo_images(tiny_model("llava"), tmp, "none"), rl.grpo_images(patched(tiny_model("llava")), tmp, "none")
        ),
        "GRPO (lora reference)": cell(
            rl.grpo_images(tiny_model("llava"), tmp, "lora"), rl.grpo_images(patched(tiny_model("llava")), tmp, "lora")
        ),
    }
    return rows, images


if __name__ == "__main__":
    main()
