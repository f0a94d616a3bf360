"""The run and its infrastructure: what every script and stage shares, whatever it trains.

- cli.py           command-line conventions: `UserError`, `run_script`, flag types and common flags, device, seed
- files.py         atomic writes (`atomic_write`, `write_json`, `write_text`) and `read_json`
- checkpoint.py    run directories, `latest`, self-describing checkpoints, lineage, `MetricsLog`
- lifecycle.py     the life cycle of a run: `resume_args`, `Run`, `TrainConfig`, `batches_from`, `checkpoint_due`
- once.py          --once: skip a stage finished with the same settings, resume an interrupted one (`previous_runs`)
- trainer.py       the one GAN training loop `Trainer` and the step base `TrainingStep`
- distributed.py   torchrun: the process group, who writes, this rank's part of a global batch, gradient averaging
- precision.py     fp32 or bf16 autocast per forward pass (`Precision`, `resolve_precision`)
"""
