"""HTTP back ends: the OpenAI-compatible and Anthropic engines on one client base (client_base.py), and the OpenAI
batch API.
"""
