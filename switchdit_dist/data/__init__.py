"""Latent data: the shard format and manifest, writers (``switchdit prepare``) and the resumable
loader the trainer uses (``LatentLoader``)."""
