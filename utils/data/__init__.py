"""Data: what the stages read, and the public/private partition.

- datasets.py   datasets, the partition and its fingerprints, `EpochBatches`, `model_shape` / `check_data_fits`
- folders.py    a user's image folder or CIFAR-10: listing, checks, decoding, the fingerprinted decode cache
- distill.py    the distillation set (stage 2 -> stage 3): its files and loader
- synthetic.py  a released synthetic dataset: its formats (PNG class folders, .npz), writing them, reading one back
- classes.py    the class names of a run's data: the named sets' lists, a folder's classes (generate.py, demo page)
"""
