"""GAN training: the losses, the non-private steps and what a stage's recipe adds to them.

- losses.py    GAN losses by name (non-saturating, hinge)
- steps.py     `NonPrivateStep` and its two updates, `fixed_inputs`, `generate`, random inputs
- ema.py       the generator's weight average (EMA with warm-up)
- augment.py   DiffAugment
- dsteps.py    discriminator steps per generator step: constant or adaptive
- recipe.py    a stage's training recipe as one settings object and one runtime object
- sampling.py  a generator's seeded, class-balanced samples (what evaluate.py measures, generate.py releases)
- latents.py   the same latent draw in numpy, for generate.py's torch-free path
"""
