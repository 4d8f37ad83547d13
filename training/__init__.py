"""Pure PyTorch core of NMoE: config, data, models, losses, routing, local loops, aggregation.

Never imports Ray: everything here runs and tests in a plain Python process.
"""
