"""Checkpoints, one room per concern.

``folders`` (names, markers, complete ones, moving aside, pruning), ``integrity``
(every file's size and sha256, the intact checkpoint a resume takes), ``manager``
(one object owns a run's resume and saves), ``parts`` (what each piece of the run's
state writes), ``fsdp_files`` (the sharded weights and optimizer without pickle).
"""
