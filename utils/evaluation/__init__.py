"""Evaluation: what is measured of a generator, and how it is reported.

- metrics.py      reference classifier, FD, precision and recall, downstream accuracy, membership AUC
- model_card.py   the model card of a private run
- plots.py        every figure
"""
