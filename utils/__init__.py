"""Shared machinery of the stage scripts: data, checkpoints and run directories, the privacy ledger, training
steps, slimming, deployment, metrics and plots."""
