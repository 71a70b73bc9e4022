"""Training checkpoints: one sharded format for every layout.

A checkpoint is one ``torch.distributed.checkpoint`` (DCP) directory,
``RUN_DIR/checkpoints/step_XXXXXXXX/``, written by all ranks in parallel, every tensor once::

    .metadata          DCP's index: every entry's shape, dtype and where its chunks are
    __{r}_{i}.distcp   DCP data files (rank r's share)
    meta.json          what the checkpoint is: format version, step, layout, model, training settings
    manifest.json      size and xxh3-128 checksum of every file above
    COMPLETE           written last, once every rank finished and the manifest exists

``latest`` (next to the step directories) names the newest complete checkpoint and moves last.

The entries are keyed by the single-device model's parameter names, experts by global id
(``schema.py`` defines them): fp32 master weights and Adam moments flattened (ZeRO partitions a
parameter as a flat range, and each rank writes its own range), the EMA in parameter shape, the
trainer state and one side-state entry per rank. Any layout (number of processes,
``parallel.ep_size``, ZeRO stage) reads any other's: DCP reads each rank the ranges it holds.

Modules: ``schema`` (what a checkpoint holds, its version, the model's identity), ``manifest``
(integrity), ``dcp_io`` (DCP with flat-range entries), ``store`` (the directory protocol: writing
crash-safely, finding, verifying and reading checkpoints). Nothing here imports DeepSpeed: the
engine side lives in ``switchdit_dist.train.engine_state``.
"""
