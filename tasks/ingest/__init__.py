"""Documents in: list the source, read and parse each file (one module per concern), and load examples and gold
labels.
"""
