"""The configs shipped with NMoE (``default.yaml``: the main job; ``smoke.yaml``: tiny, for tests)."""
