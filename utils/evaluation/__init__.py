"""Evaluation: what is measured of a generator, and how it is reported.

- metrics.py       reference classifier, FD, precision and recall, downstream accuracy, membership AUC
- model_card.py    the model card of a private run
- plots.py         every figure
- dataset_card.py  the card of a released synthetic dataset (generate.py)
- web_demo.py      the demo page's folder (make_demo.py): the page, the model, its check set; serving it
- headless.py      headless Chromium over its DevTools pipe (the demo page's check)
"""
