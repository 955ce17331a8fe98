"""The small and frontier engines of a worker process, built once, with the trained heads, rankers and measured
classifier choice they load.
"""
