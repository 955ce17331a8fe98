"""Every document gets one answer: small-model scoring, escalation within the run's budget, frontier batches, and
finishing each row.
"""
