"""What a run cost and how well routing did: the cost ledger, run reports and artifacts, trends and evaluation
metrics.
"""
