"""Sampling images from a trained model: ``generate`` (class-conditional sampling with guidance,
for ``switchdit sample`` and the evaluations) and ``command`` (``switchdit sample``: an exported
model file to an image grid)."""
