"""Shared machinery of the stage scripts, in sub-packages by concern
(docs/DESIGN.md, "Layering: where each thing lives").

Imports point downwards only, in this order: run <- data <- gan <- {privacy, compression} <- evaluation.

- run/          the run and its infrastructure: command line, files, checkpoints, life cycle, training loop, torchrun
- data/         datasets and the partition, a user's image folders, the distillation set
- gan/          GAN training: losses, the non-private steps, weight average, augmentation, D-step schedule, recipe
- privacy/      DP-SGD, the privacy ledger and accountant, the empirical audit
- compression/  GAN Slimming, compression, the device artifacts and their runtime, device cost
- evaluation/   metrics, the model card, plots
"""
