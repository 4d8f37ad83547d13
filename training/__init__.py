"""Pure PyTorch core of NMoE: config, data, models, losses, routing, local loops, aggregation.

Never imports Ray: everything here runs and tests in a plain Python process. Importing it
registers the built-in gate variants (``training/gates/``) and stage-1 objectives
(``training/objectives/``).
"""

from training import gates, objectives  # noqa: F401  (register the built-ins)
