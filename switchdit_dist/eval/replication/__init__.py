"""The multi-seed replication of Switch-DiT's claim on the digits: DiT vs Switch-DiT.

``layout`` names the files under the output folder, ``runner`` trains and evaluates with skip
markers, ``scoring`` scores one model file, ``collect`` reads a folder back, ``stats`` holds the
arithmetic, ``analysis`` builds the comparison, ``verdict`` words it, ``figures`` and ``markdown``
write it out. The entry point is :mod:`switchdit_dist.eval.replicate`.
"""
