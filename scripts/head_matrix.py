"""Print the head matrix of tests/test_heads.py as counts: every registered type x every head
class transformers maps for it, by outcome (exact, refused at apply, refused at call, upstream
cannot run the tiny config). Run from the repository root: python scripts/head_matrix.py"""

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import transformers  # noqa: E402
from test_heads import CASES, head_outcome  # noqa: E402

counts, kinds = collections.Counter(), collections.Counter()
for model_type, variant, class_name in CASES:
    for pad in (None, 0):
        try:
            outcome = head_outcome(model_type, variant, class_name, pad)
        except AssertionError as err:
            outcome = f"INEXACT: {err}"
            print(outcome, flush=True)
        key = outcome.split(":")[0]
        counts[key] += 1
        head = class_name.split("For")[-1] if "For" in class_name else "base"
        kinds[(head, key)] += 1
print(f"transformers {transformers.__version__}: {len(CASES)} (type, head class) pairs x 2 pad settings")
for key, n in counts.most_common():
    print(f"  {key}: {n}")
for (head, key), n in sorted(kinds.items()):
    print(f"  {head:28s} {key:22s} {n}")
