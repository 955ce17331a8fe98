"""HTTP back ends: the OpenAI-compatible and Anthropic engines on one async client base, the batch API and SDK failure
reading.
"""
