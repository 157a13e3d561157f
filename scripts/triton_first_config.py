"""Installed as ``sitecustomize`` by ``scripts/gpu_hybrid.sh`` when ``TRITON_CONFIGS=first``: every
Triton autotuner (fla's, mamba_ssm's) runs the first of its configurations that compiles and fits
the device (in the order the kernel lists them, after its own pruning) instead of compiling and
timing all of them (4 to 16 per kernel, each a separate compile).

Why: a fresh machine spends minutes compiling every configuration of every fla kernel (forward,
backward, varlen and plain variants) before the first step; the device time a session gets does not
cover that for four kernels, the model tests and a benchmark. The configurations differ in block
sizes over the feature dimensions and in warps/stages, not in how sequence boundaries are handled,
so the equivalence checks hold for the kernels' code; timings are of an untuned configuration, the
same one for padded (a) and packed (c) rows.

A configuration chosen for one call can still run out of shared memory in a later call with the same
tuning key (other compile-time constants; seen once, in mamba_ssm's chunk scan, cause not traced):
the run then drops that configuration for this kernel and tunes again, instead of failing the step.
"""

import math
import os

if os.environ.get("TRITON_CONFIGS", "all") == "first":
    try:
        from triton.runtime import autotuner as _autotuner
        from triton.runtime.errors import OutOfResources

        _prune, _bench, _run = (
            _autotuner.Autotuner.prune_configs,
            _autotuner.Autotuner._bench,
            _autotuner.Autotuner.run,
        )

        def _pruned(self, kwargs):  # called once per tuning, right before the configs are timed
            self._first_config_found = False
            return _prune(self, kwargs)

        def _first_that_runs(self, *args, config, **meta):
            """Time configs in order until one runs (the rest count as unusable, never compiled)."""
            if getattr(self, "_first_config_found", False):
                return [math.inf, math.inf, math.inf]
            timing = _bench(self, *args, config=config, **meta)
            self._first_config_found = math.isfinite(timing[0] if isinstance(timing, list) else timing)
            return timing

        def _run_or_next(self, *args, **kwargs):
            """Run; on a launch out of shared memory, drop the configuration and tune again."""
            while True:
                try:
                    return _run(self, *args, **kwargs)
                except OutOfResources:
                    bad = getattr(self, "best_config", None)
                    if bad is None or len(self.configs) <= 1 or bad not in self.configs:
                        raise
                    self.configs = [c for c in self.configs if c is not bad]
                    self.cache.clear()

        _autotuner.Autotuner.prune_configs = _pruned
        _autotuner.Autotuner.run = _run_or_next
        _autotuner.Autotuner._bench = _first_that_runs
    except Exception as err:  # noqa: BLE001 - a machine without Triton runs as it is
        print(f"triton_first_config: not applied ({type(err).__name__}: {err})")
