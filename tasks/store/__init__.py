"""Where bytes land and what a run has committed: atomic writes, local spill files, scratch folders, the output's
lease, state snapshots, plans and the current rows.
"""
