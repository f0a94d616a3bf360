"""Privacy: differentially private training, its accounting, and an empirical test of the claim.

- dp.py        DP-SGD on the discriminator: `DPConfig`, `DPPlan`, `plan_run`, `PrivateDiscriminator`, `DPStep`
- ledger.py    the privacy ledger carried in every checkpoint: epsilon, composition, noise calibration
- audit.py     the empirical privacy audit (Steinke, Nasr & Jagielski 2023): canaries, attacks, the lower bound
"""
