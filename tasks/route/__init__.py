"""Routing decisions and their certificates: the pure keep-or-escalate rule, threshold certification and versioned
routers.
"""
