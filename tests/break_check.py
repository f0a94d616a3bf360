"""Break checker: does the test suite notice when a guarantee breaks? (Not a test module: pytest does not collect
it.) Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python tests/break_check.py            # every break (about 10 minutes on 2 cores)
    OMP_NUM_THREADS=1 .venv/bin/python tests/break_check.py noise ghost  # only the breaks whose names contain these

It copies the repository to a temporary directory (without .venv, checkpoints, .git and caches), first runs every
selected break's tests on the unbroken copy (they must pass, or a "caught" would mean nothing), then applies one
break at a time (replace an exact piece of code by a broken one), runs that break's tests and puts the code back.
It prints a table: caught (the tests failed), NOT CAUGHT (they passed), pattern not found (the code moved: update
the break's old text), error (pytest could not run them). The exit status is 1 when any break is not caught.

Each break is (name, file, exact old text, new text, pytest selection, what it means). Keep the old text small, so
that a refactor that keeps the behaviour keeps the pattern findable; when a pattern is not found, find where the
guarded code went and update the break, never delete it.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass


@dataclass
class Break:
    name: str
    file: str
    old: str
    new: str
    tests: tuple
    meaning: str


DIST = "tests/test_distributed.py"
R, N, F, T, E, C, D, L = ("tests/test_reliability.py", "tests/test_dp_noise.py", "tests/test_fine_tune.py",
                          "tests/test_teacher.py", "tests/test_evaluate.py", "tests/test_compress.py",
                          "tests/test_data.py", "tests/test_lifecycle.py")
P = "tests/test_protocol.py"
U, UR = "tests/test_audit.py", "tests/test_audit_run.py"
I, S = "tests/test_folder_data.py", "tests/test_model_shapes.py"
O = "tests/test_discriminator_options.py"
PR = "tests/test_precision.py"
Q = "tests/test_dp_sampling.py::test_poisson_batches_of_a_dp_step_are_drawn_at_the_ledgers_q"
QDIST = DIST + "::test_dp_poisson_batches_of_the_ranks_together_are_one_sample_at_the_ledgers_q"
FR = "tests/test_fake_reuse.py"
V = "tests/test_dp_step_variants.py"
MR = "tests/test_make_resume.py"
RD = "tests/test_reproduce_dp.py"
DEMO = "tests/test_demo.py"
DEMO_PAGE = DEMO + "::test_page_runs_the_generator_offline_and_matches_the_python_runtime"
GEN = "tests/test_generate.py"
GEN_FORMATS = GEN + "::test_both_formats_read_back_balanced_and_labelled_and_the_card_states_the_ledgers_epsilon"
GEN_ONNX = GEN + "::test_a_generator_onnx_alone_writes_the_torch_paths_images_without_torch"
GEN_REFUSE = GEN + "::test_generate_refuses_bad_input_and_writes_nothing"
GEN_EVAL_REFUSE = GEN + "::test_evaluate_refuses_a_set_of_another_shape_or_classes"
SR = "tests/test_student_recovery.py"
SR_PENALTY = (SR + "::test_params_penalty_weights_channels_by_their_parameters_only",
              SR + "::test_the_step_thresholds_each_layer_by_its_penalty_weight")
SR_KEEPS = SR + "::test_recovery_keeps_exactly_the_dead_channels_while_the_live_weights_train"
SR_STARTS = SR + "::test_recovery_starts_from_the_init_students_generator_and_discriminator"
SD = "tests/test_student_discriminator.py"
SD_CARRIED = SD + "::test_the_students_narrow_discriminator_is_the_one_the_dp_stage_trains"
SD_REFUSED = SD + "::test_a_contradiction_or_widths_that_do_not_fit_are_refused_in_one_line"
SD_SEEDED = SD + "::test_the_fresh_discriminator_is_seeded_and_without_the_flag_is_the_teachers"
AUX = "tests/test_aux_discriminator.py"
AUX_SAME = AUX + "::test_the_flag_adds_the_narrow_discriminator_and_changes_nothing_else"
AUX_STEP = AUX + "::test_one_step_is_its_own_adam_step_on_ds_views_of_the_same_images_with_ds_loss"
AUX_IDENTICAL = AUX + "::test_g_d_and_the_average_are_bit_identical_with_and_without_it"
AUX_RESUME = AUX + "::test_snapshot_keeps_it_and_resume_equals_the_uninterrupted_run"
AUX_SEEDED = AUX + "::test_a_fresh_one_follows_the_seed_and_draws_nothing_from_the_global_generator"
AUX_CHAIN = AUX + "::test_the_student_the_compact_run_and_the_dp_stage_take_it"
AUX_REFUSED = AUX + "::test_refusals_in_one_line_before_anything_is_written"

BREAKS = [
    # ------------------------------------------------------------ DP-SGD really happens
    Break("noise-not-added", "utils/privacy/dp.py", "noise_multiplier=noise_multiplier,", "noise_multiplier=0.0,",
          (N,), "Opacus is given sigma 0: the clipped mean alone is applied while the ledger records sigma"),
    Break("ledger-sigma-not-used", "utils/privacy/dp.py", "noise, engine = plan.noise_multiplier, config",
          "noise, engine = 0.5 * plan.noise_multiplier, config",
          (N + "::test_the_ledgers_sigma_is_the_sigma_used",),
          "the training loop adds half the noise of the sigma its ledger (and epsilon) is computed from"),
    Break("noise-unseeded", "utils/privacy/dp.py", "noise_generator=self.noise_rng, ", "",
          (N + "::test_noise_comes_from_the_runs_seeded_generator",),
          "the noise is drawn from the global generator, not the run's own seeded one (resume drifts)"),
    Break("ghost-without-wrapper", "utils/privacy/dp.py", "if self.criterion is None:", "if True:",
          (N + "::test_every_grad_sample_mode_clips_each_pair_exactly",),
          "ghost mode's loss bypasses Opacus's per-sample loss wrapper: no clipping at all"),
    Break("clipping-off", "utils/privacy/dp.py", "max_grad_norm=config.max_grad_norm, poisson_sampling",
          "max_grad_norm=1e6, poisson_sampling", (N + "::test_every_grad_sample_mode_clips_each_pair_exactly",),
          "per-sample gradients are clipped to a norm that never binds"),
    Break("dp-bar-epsilon-stale", "utils/privacy/dp.py",
          "self.EPS_REFRESH_SECONDS):\n            self.epsilon()", "self.EPS_REFRESH_SECONDS):\n            pass",
          (N + "::test_the_progress_bars_epsilon_moves_before_the_first_epoch_ends",),
          "a DP stage shorter than an epoch shows epsilon 0.000 on its progress bar until its last step"),
    Break("dead-channel-optimizer-state-kept", "utils/compression/slimming.py", "value.masked_fill_(dead, 0.0)",
          "pass", ("tests/test_student.py::test_dead_channels_stay_exactly_zero",),
          "a dead channel's momentum and Adam moments survive, so its optimiser keeps a stale direction for it"),
    Break("dead-channel-not-pinned", "utils/compression/slimming.py", "        norm.enforce_dead()\n", "",
          ("tests/test_student.py::test_dead_channels_stay_exactly_zero",),
          "a dead channel's gamma and beta are not pinned at 0 after a step: an Adam step moves them off 0 again"),
    # ------------------------------------------------------------ the Poisson batches are drawn at the ledger's q
    Break("dp-poisson-rate-doubled", "utils/privacy/dp.py", "DPDataLoader(SplitDataset(split), sample_rate=self.",
          "DPDataLoader(SplitDataset(split), sample_rate=2 * self.", (Q, QDIST),
          "the sampler draws the Poisson batches at twice the q the accountant and the ledger are told"),
    Break("dp-accountant-q-of-the-loader", "utils/privacy/dp.py",
          "get_optimizer_hook_fn(sample_rate=self.sample_rate)",
          "get_optimizer_hook_fn(sample_rate=1 / len(self.loader))",
          (Q,), "the accountant composes Opacus's 1/int(1/q), not the q the batches are drawn at and the ledger holds"),
    Break("dp-rank-draws-its-own-sample", "utils/privacy/dp.py",
          "self.sample_rng = torch.Generator().manual_seed(seed + SAMPLER_SEED_OFFSET)",
          "self.sample_rng = torch.Generator().manual_seed(seed + SAMPLER_SEED_OFFSET + (torch.distributed.get_rank() "
          "if torch.distributed.is_initialized() else 0))", (QDIST,),
          "under torchrun each rank draws its own Poisson sample and trains on its part of it: the ranks' parts "
          "together are no Poisson sample of the split, and the ranks disagree on the batch size"),
    Break("dp-rank-keeps-the-whole-sample", "utils/privacy/dp.py", "mine, n_global = local_poisson_batch(indices)",
          "mine, n_global = list(indices), len(indices)", (QDIST,),
          "under torchrun every rank trains on the whole Poisson batch: each sampled record counts once per rank"),
    # ------------------------------------------------------------ --reuse-fakes: one pool of fakes per generator step
    Break("fakes-reused-across-a-generator-step", "utils/privacy/dp.py", "            self.pool.refresh()",
          "            pass", (FR + "::test_one_pool_per_generator_step_drawn_from_the_current_generator",),
          "the pool is not refreshed after a generator step: D keeps training on fakes of an older generator"),
    Break("pool-fakes-not-used", "utils/privacy/dp.py",
          "    if pool is None:\n        z, fake_labels = local_random_inputs",
          "    if True:\n        z, fake_labels = local_random_inputs",
          (FR + "::test_reused_fakes_every_mode_clips_each_pair_exactly",),
          "with --reuse-fakes the D step still draws fresh fakes: the pool is drawn and ignored"),
    Break("pool-not-grown-for-a-larger-batch", "utils/privacy/dp.py",
          "while self.fakes is None or len(self.fakes) < n_global:", "while self.fakes is None:",
          (FR + "::test_reused_fakes_every_mode_clips_each_pair_exactly",
           FR + "::test_pool_grows_by_whole_chunks_and_is_kept_until_refreshed"),
          "a Poisson batch larger than the pool gets fewer fakes than real examples"),
    Break("pool-drawn-only-for-non-empty-batches", "utils/privacy/dp.py",
          "    if pool is not None:  # drawn even", "    if pool is not None and n_global:  # drawn even",
          (FR + "::test_an_empty_batch_still_draws_the_pool",),
          "whether a pool is drawn (and the generator's BatchNorm statistics move) depends on the Poisson batch"),
    Break("fake-pool-not-saved", "utils/privacy/dp.py",
          'pool = {} if self.pool is None else {"fake_pool": self.pool.state_dict()}', "pool = {}",
          (FR + "::test_reuse_fakes_resume_equals_uninterrupted",), "the checkpoint lacks the pool of fakes"),
    Break("fake-pool-redrawn-on-resume", "utils/privacy/dp.py",
          'self.pool.load_state_dict(checkpoint["dp"].get("fake_pool"), self.device)', "self.pool.refresh()",
          (FR + "::test_reuse_fakes_resume_equals_uninterrupted",),
          "a resumed --reuse-fakes run draws its pool again instead of reading it back: another run"),
    Break("fakes-reused-when-off", "utils/privacy/dp.py", "if config.reuse_fakes else None", "if True else None",
          (FR + "::test_off_is_bit_identical_to_the_code_before_the_option",
           FR + "::test_off_draws_fresh_fakes_every_d_step"),
          "without --reuse-fakes the runs are no longer the code's before the option"),
    Break("pool-parts-not-gathered", "utils/run/distributed.py",
          "    if not is_distributed():\n        return local\n    bounds",
          "    if True:\n        return local\n    bounds",
          (DIST + "::test_two_process_fake_pool_is_the_one_process_pool",),
          "under torchrun each rank keeps only its own part of the pool: a batch's first n fakes are not the pool's"),
    # ------------------------------------------------------------ the DP step's per-pair gradient modes (issue 25)
    Break("fused-pairs-mispaired", "utils/privacy/pair_gradients.py", "(s_n, n * s_n, sh * s_h,",
          "(2 * s_n, s_n, sh * s_h,", (V + "::test_pair_gradients_match_autograd_pair_by_pair",
                                       N + "::test_every_grad_sample_mode_clips_each_pair_exactly"),
          "the fused mode pairs sample 2i with 2i+1 instead of real i with fake i: no record's pair is clipped"),
    Break("fused-bias-of-the-reals-only", "utils/privacy/pair_gradients.py", "return weight, side_by_side.sum(dim=2)",
          "return weight, side_by_side[:, :, :t].sum(dim=2)",
          (V + "::test_every_mode_clips_each_pair_at_the_median_norm_exactly_over_batches_of_other_sizes",),
          "the fused mode's bias gradients leave out the fakes: the clipped norm is not the pair's"),
    Break("fused-loss-averaged", "utils/privacy/pair_gradients.py", "torch.autograd.grad(losses.sum(),",
          "torch.autograd.grad(losses.mean(),",
          (V + "::test_every_mode_clips_each_pair_at_the_median_norm_exactly_over_batches_of_other_sizes",),
          "the fused per-pair gradients are 1/n of the pairs' (a factor hides while every pair stays clipped)"),
    Break("fused-fakes-get-the-real-labels", "utils/privacy/pair_gradients.py",
          "torch.cat([real_labels, fake_labels])", "torch.cat([real_labels, real_labels])",
          (V + "::test_pair_gradients_match_autograd_pair_by_pair",),
          "the fused mode conditions the fakes on the real batch's labels"),
    Break("fused-buffer-not-grown", "utils/privacy/pair_gradients.py",
          "if held is None or len(held) < n or", "if held is None or",
          (V + "::test_every_mode_clips_each_pair_at_the_median_norm_exactly_over_batches_of_other_sizes",),
          "a Poisson batch larger than the first one finds the fused mode's buffers too small"),
    Break("vmap-fake-replaced-by-real", "utils/privacy/pair_gradients.py", "torch.stack([x_r, x_f])",
          "torch.stack([x_r, x_r])", (V + "::test_pair_gradients_match_autograd_pair_by_pair",),
          "the vmap mode's pair is the real example twice"),
    Break("bench-exactness-check-disabled", "benchmarks/bench_dp_step.py",
          "exact = grad_err < EXACT_RTOL and", "exact = True or grad_err < EXACT_RTOL and",
          (V + "::test_the_benchmark_checks_every_variant_and_its_check_can_fail",),
          "bench_dp_step.py calls every variant exact: its table's exact column means nothing"),
    # ------------------------------------------------------------ DP-SGD never trains a D that mixes samples
    Break("dp-accepts-minibatch-std", "utils/privacy/dp.py", "        check_private_discriminator(D)  # before Opacus",
          "        #", (O + "::test_private_discriminator_refuses_the_std_layer",),
          "PrivateDiscriminator takes a discriminator with a minibatch std layer: clipping bounds no record's "
          "influence"),
    Break("opacus-validator-not-registered", "utils/privacy/dp.py",
          "    register_module_validator(MinibatchStdDev)(minibatch_std_errors)", "    pass",
          (O + "::test_opacus_validator_rejects_the_std_layer_and_accepts_the_others",),
          "Opacus's ModuleValidator passes a discriminator with a minibatch std layer"),
    Break("fine-tune-keeps-minibatch-std", "fine_tune.py", "    if D.minibatch_std:\n        D = D.without",
          "    if False:\n        D = D.without", (O + "::test_fine_tune_strips_the_std_layer",),
          "fine_tune.py hands a teacher's minibatch std layer on to DP-SGD instead of stripping it"),
    Break("without-minibatch-std-keeps-the-layer", "models/discriminator.py",
          '**{**self.model_args(), "minibatch_std": 0})', "**self.model_args())",
          (O + "::test_without_minibatch_std_keeps_the_function_when_the_std_weights_are_zero",
           O + "::test_fine_tune_strips_the_std_layer"),
          "Discriminator.without_minibatch_std returns a discriminator that still mixes samples"),
    # ------------------------------------------------------------ precision and snapshots
    Break("fp32-uses-channels-last", "utils/run/precision.py", "self.bf16 and CHANNELS_LAST[use]", "CHANNELS_LAST[use]",
          (PR + "::test_fp32_is_bit_identical_to_the_code_before_the_option",),
          "--precision fp32 changes the memory layout, so its results are no longer today's bit for bit"),
    Break("autocast-left-open", "utils/run/precision.py",
          "        return torch.autocast(self.device_type, dtype=torch.bfloat16)",
          "        torch.set_autocast_enabled(self.device_type, True)\n"
          "        torch.set_autocast_dtype(self.device_type, torch.bfloat16)\n"
          "        return contextlib.nullcontext()",
          (PR + "::test_bf16_covers_each_forward_pass_and_nothing_else",),
          "bf16 autocast stays on after a forward pass: optimiser steps run inside it (stale cached casts)"),
    Break("bf16-logits-to-the-loss", "utils/run/precision.py", "        return output.float()", "        return output",
          (PR + "::test_bf16_covers_each_forward_pass_and_nothing_else",),
          "the losses are computed on bfloat16 logits"),
    Break("auto-bf16-where-not-native", "utils/run/precision.py",
          'return Precision("fp32", device.type, reason=f"auto: {reason}")',
          'return Precision("bf16", device.type, reason=f"auto: {reason}")',
          (PR + "::test_auto_falls_back_to_fp32_where_bf16_is_not_native",),
          "--precision auto picks bf16 on hardware without native bf16"),
    Break("dp-teacher-in-bf16", "train_teacher.py", "allowed=not args.dp,", "allowed=True,",
          (PR + "::test_dp_paths_stay_float32",), "train_teacher.py --dp runs its DP-SGD forward passes in bf16"),
    Break("teacher-default-d-not-the-recipe", "train_teacher.py",
          'return NON_PRIVATE_D_CHANNELS.get(model_shape(split)["image_size"])', "return None",
          ("tests/test_teacher.py::test_default_discriminator_is_the_measured_recipe_without_dp_and_the_models_with_dp",),
          "a non-private teacher without --d-channels trains the old 64/128 discriminator, not the measured recipe"),
    Break("dp-teacher-gets-the-non-private-d", "train_teacher.py", "if args.d_channels or args.dp:",
          "if args.d_channels:",
          ("tests/test_teacher.py::test_default_discriminator_is_the_measured_recipe_without_dp_and_the_models_with_dp",),
          "a DP teacher gets the wide non-private discriminator, never measured under DP-SGD"),
    Break("global-batchnorm-in-bfloat16", "utils/run/distributed.py", "dtype, x = x.dtype, x.float()",
          "dtype = x.dtype", ("tests/test_scale_out.py::test_two_process_bf16_teacher_equals_one_process",),
          "the global-batch BatchNorm of torchrun mixes bfloat16 activations with its float32 running statistics"),
    Break("snapshot-not-kept", "utils/run/trainer.py", "if self.step in self.config.snapshot_steps:", "if False:",
          (PR + "::test_snapshots_are_kept_at_the_chosen_steps_and_survive_a_resume",
           PR + "::test_student_keeps_snapshots"), "--snapshot-steps writes no snapshot"),
    # ------------------------------------------------------------ killed and resumed equals uninterrupted
    Break("dp-teacher-checkpoint-without-dp-state", "utils/run/trainer.py", "**own, **self.extra)", "**self.extra)",
          (R + "::test_dp_teacher_sigkill_then_resume_equals_an_uninterrupted_run",),
          "the --dp teacher's checkpoint lacks the accountant history, plan and losses of its DP step"),
    Break("dp-teacher-checkpoint-without-sampler-noise-rng", "utils/privacy/dp.py",
          '{"train": self.rng.get_state(), **self.pd.rng_states()}', '{"train": self.rng.get_state()}',
          (R + "::test_dp_teacher_sigkill_then_resume_equals_an_uninterrupted_run",),
          "the --dp teacher's checkpoint keeps only the training generator, losing the sampler's and noise's"),
    Break("resumed-order-empty", "utils/data/datasets.py", "for i in range(start, len(self)):",
          "for i in range(start, len(self) if start == 0 else 0):", (D + "::test_epoch_order_is_seeded_and_resumable",),
          "a resumed epoch yields no batches (a test comparing with all() over zip() would pass vacuously)"),
    # ------------------------------------------------------------ atomic writes
    Break("checkpoint-not-atomic", "utils/run/files.py", 'tmp = f"{path}.tmp.{os.getpid()}"', "tmp = path",
          (R + "::test_a_failed_save_keeps_the_previous_checkpoint_and_latest",),
          "checkpoint.pt is written in place: a save failing midway destroys the previous checkpoint"),
    Break("latest-before-checkpoint", "utils/run/lifecycle.py",
          "        save_checkpoint(self.run_dir, checkpoint)\n        mark_latest(self.run_dir)",
          "        mark_latest(self.run_dir)\n        save_checkpoint(self.run_dir, checkpoint)",
          (R + "::test_a_failed_save_keeps_the_previous_checkpoint_and_latest",),
          "`latest` moves to a run before its checkpoint is complete"),
    # ------------------------------------------------------------ refusals change nothing on disk
    Break("evaluate-run-dir-before-checks", "evaluate.py",
          '    data = load_data(args, runs[0]["model_args"]["generator"])\n',
          '    data = load_data(args, runs[0]["model_args"]["generator"])\n    Run.open(args, STAGE, "early")\n',
          (R + "::test_evaluate_refuses_delta_and_partition_before_writing",),
          "evaluate.py creates its run directory before checking --delta and the partition"),
    Break("refusal-leaves-empty-run-dir", "fine_tune.py",
          "    plan = plan_for(checkpoint, config, train, split, ledger)",
          '    Run.open(args, STAGE, "early")\n'
          "    plan = plan_for(checkpoint, config, train, split, ledger)",
          (R + "::test_nonsense_numbers",), "a refused fine-tuning (bad --delta) leaves a run directory"),
    Break("fine-tune-resume-cuts-metrics-before-checks", "fine_tune.py",
          "    args, checkpoint = resume_args(args, run_stage(args))\n",
          "    args, checkpoint = resume_args(args, run_stage(args))\n"
          "    if checkpoint is not None:\n        Run.open(args, run_stage(args), None, checkpoint)\n",
          (R + "::test_resume_with_the_dataset_gone_changes_nothing",),
          "fine_tune.py --resume cuts metrics.jsonl back before the dataset is found (the issue-16 defect)"),
    Break("teacher-resume-cuts-metrics-before-checks", "train_teacher.py",
          "    args, checkpoint = resume_args(args, STAGE)\n",
          "    args, checkpoint = resume_args(args, STAGE)\n"
          "    if checkpoint is not None:\n        Run.open(args, STAGE, None, checkpoint)\n",
          (R + "::test_resume_with_the_dataset_gone_changes_nothing",),
          "train_teacher.py --resume cuts metrics.jsonl back before the dataset is found"),
    # ------------------------------------------------------------ the run life cycle (issue 10)
    Break("paths-stored-absolute", "utils/run/checkpoint.py",
          "stored = stored_paths(checkpoint, pipeline_root(run_dir))", "stored = dict(checkpoint)",
          (L + "::test_paths_are_stored_relative_and_a_moved_pipeline_resolves",),
          "checkpoints name other runs by absolute path: a moved pipeline directory no longer resolves"),
    Break("progress-refreshes-every-step", "utils/run/trainer.py", "refresh=False)", "refresh=True)",
          (L + "::test_training_log_is_short_when_output_is_a_file",),
          "a log file gets one progress line per training step"),
    # ------------------------------------------------------------ --once: make reproduce run again (issue 27)
    Break("once-ignores-settings", "utils/run/once.py", "record.settings != settings or ", "",
          (L + "::test_once_skips_a_run_finished_with_the_same_settings_and_no_other",),
          "--once skips a stage whose earlier run finished with other settings"),
    Break("once-ignores-inputs", "utils/run/once.py", "    named = _paths(settings.get(key) for key in PATH_ARGS)\n",
          "    return True\n", (L + "::test_once_runs_a_stage_again_when_the_run_it_reads_is_no_longer_the_latest",),
          "--once skips a stage whose input was replaced upstream (the compact model of the previous student)"),
    Break("once-takes-interrupted-for-finished", "utils/run/once.py",
          "return RunRecord(run_settings(args, root), reads, False,",
          "return RunRecord(run_settings(args, root), reads, has_checkpoint,",
          (MR + "::test_a_killed_chain_run_again_ends_with_the_files_of_an_uninterrupted_one",),
          "a run with a checkpoint counts as finished: make reproduce run again skips the student it killed"),
    Break("once-does-not-resume", "utils/run/once.py", "        elif resumable and record.has_checkpoint:",
          "        elif False:", (L + "::test_once_continues_an_interrupted_run_to_the_uninterrupted_result",),
          "--once starts an interrupted run again from step 0 instead of continuing it"),
    Break("finished-not-recorded", "utils/run/lifecycle.py", "            write_json(self.path(FINISHED_NAME), {",
          "            (lambda *record: None)(self.path(FINISHED_NAME), {",
          (MR + "::test_a_second_run_of_a_finished_chain_changes_nothing",),
          "a finished run does not say so: make reproduce run again runs every stage again"),
    Break("skip-leaves-latest", "utils/run/once.py", "            mark_latest(previous.finished)", "            pass",
          (L + "::test_once_skips_a_run_finished_with_the_same_settings_and_no_other",),
          "a skipped stage leaves `latest` at a run of other settings, which the next stage then reads"),
    Break("unfinished-once-run-kept", "utils/run/once.py", "        shutil.rmtree(run_dir)", "        pass",
          (L + "::test_once_starts_again_in_place_of_a_run_that_left_nothing_to_resume",),
          "a run killed before its first checkpoint stays beside the new one (another number, a leftover)"),
    Break("partial-writes-kept", "utils/run/lifecycle.py", "                    remove_partial_writes(directory)",
          "                    pass", (L + "::test_once_continues_an_interrupted_run_to_the_uninterrupted_result",),
          "a continued run keeps the leftovers of writes its kill cut short (a `*.tmp.<pid>` file, a `.latest.<pid>`)"),
    Break("pipeline-stage-silent", "utils/run/cli.py",
          '        print(f"== stage {args.pipeline_stage} {script}: {what}", flush=True)', "        pass",
          (L + "::test_once_continues_an_interrupted_run_to_the_uninterrupted_result",),
          "make reproduce does not say which stage of six runs, nor how long each took"),
    # ------------------------------------------------------------ make reproduce-dp: route 2 (issue 27, item 4)
    Break("dp-route-stage-without-once", "Makefile", "train_student.py --out $(OUT_DP) --once ",
          "train_student.py --out $(OUT_DP) ",
          (RD + "::test_six_stages_in_order_each_once_with_k_of_6_and_no_fine_tuning",),
          "make reproduce-dp run again trains route 2's student from step 0 instead of continuing or skipping it"),
    Break("reproduce-teacher-epochs-cut-short", "Makefile", "--max-steps 8000 --epochs 103",
          "--max-steps 8000 --epochs 30",
          (MR + "::test_the_teacher_runs_the_recipes_length_and_its_epochs_hold_every_step",),
          "make reproduce's teacher stops at 30 epochs (2,340 steps), not the recipe's 8,000, and says nothing"),
    Break("reproduce-teacher-not-the-recipe", "Makefile", "--max-steps 8000 --epochs 103 --batch-size 128",
          "--max-steps 8000 --epochs 103 --batch-size 128 --d-channels 64 128",
          (MR + "::test_the_teacher_runs_the_recipes_length_and_its_epochs_hold_every_step",),
          "make reproduce's teacher trains the narrow discriminator, not the recipe's"),
    Break("reproduce-student-the-seeds-length", "Makefile", "--max-steps 4000 --epochs 2 --batch-size 64 --rho 0.01",
          "--epochs 20 --rho 0.01",
          (MR + "::test_the_student_runs_its_curves_length_and_its_epochs_hold_every_step",),
          "make reproduce's student runs the seed's 31,250 steps (about 11 hours), past where its curve stops improving"),
    Break("reproduce-student-epochs-cut-short", "Makefile", "--max-steps 4000 --epochs 2 --batch-size 64",
          "--max-steps 4000 --epochs 1 --batch-size 64",
          (MR + "::test_the_student_runs_its_curves_length_and_its_epochs_hold_every_step",),
          "make reproduce's student stops after one epoch of the 200k set (3,125 steps), short of its 4,000"),
    Break("dp-route-stage-numbers-wrong", "Makefile", "--pipeline-stage 5/6 $(DP_EVAL)",
          "--pipeline-stage 5/7 $(DP_EVAL)",
          (RD + "::test_six_stages_in_order_each_once_with_k_of_6_and_no_fine_tuning",),
          "make reproduce-dp announces a stage as one of seven (or another number) when it has six"),
    Break("dp-route-fine-tunes", "Makefile", "\t$(PY) evaluate.py --out $(OUT_DP)",
          "\t$(PY) fine_tune.py --out $(OUT_DP) --once\n\t$(PY) evaluate.py --out $(OUT_DP)",
          (RD + "::test_six_stages_in_order_each_once_with_k_of_6_and_no_fine_tuning",),
          "route 2 spends privacy a second time in a DP fine-tuning stage that the route does not have"),
    Break("dp-teacher-split-overridable", "Makefile", "$(DP_TEACHER) --dp --split private",
          "--dp --split private $(DP_TEACHER)",
          (RD + "::test_the_teacher_is_dp_on_the_private_split_whatever_dp_teacher_says",
           RD + "::test_the_teachers_command_trains_on_the_private_split_and_reads_nothing_public"),
          "a DP_TEACHER with --split public (issue 25's replacement, a user's override) trains route 2 on public data"),
    Break("dp-teacher-not-dp", "Makefile", "$(DP_TEACHER) --dp --split private", "$(DP_TEACHER) --split private",
          (RD + "::test_the_teachers_command_trains_on_the_private_split_and_reads_nothing_public",),
          "route 2's teacher reads the private split without DP: its epsilon is infinite"),
    Break("dp-eval-reads-every-latest", "Makefile",
          "$(DP_EVAL) \\\n\t\t--runs $(OUT_DP)/teacher/latest $(OUT_DP)/compact/latest", "$(DP_EVAL)",
          (RD + "::test_evaluation_and_release_read_this_routes_runs_even_in_route_1s_out",),
          "in a route-1 OUT, route 2's evaluation scores route 1's private generator against route 2's teacher"),
    Break("dp-release-reads-private-latest", "Makefile", " --run $(OUT_DP)/compact/latest", "",
          (RD + "::test_evaluation_and_release_read_this_routes_runs_even_in_route_1s_out",),
          "in a route-1 OUT, route 2 releases route 1's private generator (or, in its own OUT, fails at the end)"),
    Break("pipeline-dp-stage-gets-the-wide-d", "Makefile", "--max-steps 3000 --d-channels 64 128 ", "--max-steps 3000 ",
          ("tests/test_reproduce_dp.py::test_make_pipelines_dp_stage_inherits_the_narrow_discriminator",),
          "make pipeline's teacher trains the wide default discriminator, which its DP stage inherits"),
    Break("dp-out-shared-with-route-1", "Makefile", "OUT_DP ?= $(OUT)/route2", "OUT_DP ?= $(OUT)",
          (RD + "::test_route_2_has_an_out_of_its_own_apart_from_route_1s",),
          "route 2 writes into route 1's stage directories and moves their `latest` links"),
    Break("dp-size-not-a-variable", "Makefile", "--pipeline-stage 2/6 $(DP_DISTILL)",
          "--pipeline-stage 2/6 --num-samples 20000", (RD + "::test_the_dp_variables_set_the_sizes",),
          "a DP_* variable (issue 25's settings, a test's tiny sizes) does not reach its stage"),
    Break("dp-settings-not-route-2s", "Makefile", "--d-steps-per-g-step 2 --reuse-fakes",
          "--adaptive-d-steps --d-steps-per-g-step 2 --reuse-fakes", (RD + "::test_the_dp_variables_set_the_sizes",),
          "the target runs other settings than the route-2 ones recipe.md measured (b512-d2c, 70.5 / 71.3 %): the "
          "adaptive schedule (b512-d2, 69.2 / 66.7 %)"),
    Break("dp-eval-not-published", "Makefile", "DP_EVAL ?=\n", "DP_EVAL ?= --quick\n",
          (RD + "::test_the_dp_variables_set_the_sizes",),
          "route 2's evaluation runs the quick variant, whose numbers are not comparable with published ones"),
    # ------------------------------------------------------------ what is reported
    Break("stage-epsilon-reported-as-total", "utils/privacy/dp.py",
          "is_private(ledger) and history(ledger) == own_history",
          "is_private(ledger) and True", (F + "::test_dp_teacher_route_composes",),
          "metrics and epsilon.png report this stage's epsilon as the total on a composed (DP teacher) route"),
    Break("compression-guard-loosened", "utils/compression/compress.py", "MAX_ABS_DIFF = 1e-5", "MAX_ABS_DIFF = 5e-4",
          (C + "::test_a_difference_just_above_the_tolerance_is_refused",),
          "the compact-equals-student guard accepts 50x the guaranteed difference"),
    Break("fd-zero-in-evaluate", "evaluate.py", "fd = frechet_distance(", "fd = 0.0 * frechet_distance(",
          (E + "::test_evaluate_writes_every_output_with_a_row_per_run",), "evaluate.py reports FD 0 for every run"),
    Break("fd-zero", "utils/evaluation/metrics.py",
          "return max(0.0, float(diff @ diff", "return 0.0 * max(0.0, float(diff @ diff",
          (E,), "the Frechet distance is always 0"),
    Break("fd-without-square-root", "utils/evaluation/metrics.py",
          "trace_cross = np.sqrt(np.clip(", "trace_cross = (np.clip(",
          (E,), "the Frechet distance's cross term misses its matrix square root"),
    Break("auc-half-in-evaluate", "evaluate.py", '"mia_auc": membership_auc(members, nonmembers, generated, *labels),',
          '"mia_auc": 0.5,', (E + "::test_evaluate_writes_every_output_with_a_row_per_run",),
          "evaluate.py reports a membership AUC of 0.5 whatever the generator"),
    Break("auc-half", "utils/evaluation/metrics.py", "return rank_auc(member_scores.numpy(), nonmember_scores.numpy())",
          "return 0.5", (E,), "the membership AUC is always 0.5"),
    # ------------------------------------------------------------ the privacy audit (issue 13)
    Break("audit-bound-delta-without-2m", "utils/privacy/audit.py", "float(beta + alpha * delta * 2 * m)",
          "float(beta + alpha * delta)", (U + "::test_p_value_two_guesses_by_hand",),
          "Theorem 3.1's delta term misses its factor 2m: the p-value is too small, the lower bound too large"),
    Break("audit-bound-ignores-delta", "utils/privacy/audit.py", "bound = epsilon_lower_bound(m, r, v, delta, ",
          "bound = epsilon_lower_bound(m, r, v, 0.0, ",
          (U + "::test_separable_scores_give_a_positive_bound_and_the_claim_check_raises",),
          "each guess plan's bound is computed at delta 0 instead of the run's delta (too large)"),
    Break("audit-bound-wrong-direction", "utils/privacy/audit.py",
          "low, high = (middle, high) if p_value(m, r, v, middle, delta) < significance else (low, middle)",
          "low, high = (low, middle) if p_value(m, r, v, middle, delta) < significance else (middle, high)",
          (U + "::test_all_ten_guesses_right_without_delta_gives_the_closed_form",),
          "the bisection for the largest rejected epsilon moves the wrong way"),
    Break("audit-bonferroni-dropped", "utils/privacy/audit.py",
          "settings.significance / len(plans))", "settings.significance)",
          (U + "::test_separable_scores_give_a_positive_bound_and_the_claim_check_raises",),
          "the best of ten guess plans is reported at 95% each: not a valid 95% bound"),
    Break("audit-inclusion-unseeded", "utils/privacy/audit.py",
          "torch.rand(count, generator=canary_generator(seed, 2))",
          "torch.rand(count)", (U + "::test_about_half_the_canaries_are_included",),
          "which canaries go in is not a function of the seed (the audit cannot be rebuilt and checked)"),
    Break("audit-claim-check-disabled", "utils/privacy/audit.py",
          "broken = [r for r in results if r.epsilon_lower_bound > claimed_epsilon]", "broken = []",
          (U + "::test_separable_scores_give_a_positive_bound_and_the_claim_check_raises",),
          "a lower bound above the claimed epsilon passes silently"),
    Break("audit-claim-check-skipped", "audit.py", '        check_claim(entry["claimed_epsilon"], entry["results"])',
          "        pass", (UR + "::test_a_bound_above_the_claim_writes_the_report_then_fails_loudly",),
          "audit.py writes its report but never compares the bounds with the claims (exit 0)"),
    Break("audit-subset-ignored", "fine_tune.py", "        split = seeded_subset(split, args.audit_subset, args.seed)",
          "        pass", (UR + "::test_audit_subset_is_the_audit_split_recorded_and_sets_the_sample_rate",),
          "--audit-subset is accepted but the audit trains on the whole private split"),
    Break("subset-draw-unseeded", "utils/data/datasets.py",
          "generator = torch.Generator().manual_seed(seed + SUBSET_SEED_OFFSET)", "generator = None", (D + "::test_seeded_subset_is_deterministic_recorded_and_keeps_the_split_it_is_of",),
          "a seeded subset is drawn from the global generator: not rebuildable from its record"),
    Break("dp-sample-rate-of-the-partition", "utils/privacy/dp.py", "sample_rate = train.batch_size / len(split)",
          'sample_rate = train.batch_size / split.partition["private_size"]',
          (UR + "::test_audit_subset_is_the_audit_split_recorded_and_sets_the_sample_rate",),
          "the accountant's q is B over the partition's private size, not over the split trained on (an audit "
          "split with canaries or a subset is accounted at the wrong rate)"),
    Break("audit-canaries-drawn-in-eval-mode", "utils/privacy/audit.py", "G = copy.deepcopy(G).cpu().train()",
          "G = copy.deepcopy(G).cpu().eval()",
          (U + "::test_generated_canaries_are_the_generators_fakes_seeded_and_labelled_with_their_class",),
          "generated canaries are not drawn as D's fakes are (eval-mode BatchNorm: another image family)"),
    Break("audit-resume-redraws-canaries", "fine_tune.py", "    if checkpoint is not None:\n        canaries = load",
          "    if False:\n        canaries = load", (UR + "::test_a_resumed_audit_run_reads_back_its_canaries",),
          "a resumed audit run draws its canaries again from its own trained generator: other images"),
    Break("audit-stored-canaries-unchecked", "utils/privacy/audit.py", "    if mismatch or not torch.equal(",
          "    if False and not torch.equal(", (UR + "::test_audit_refuses_canaries_other_than_the_recorded_ones",),
          "audit.py scores whatever canaries.pt holds, not the canaries the ledger records"),
    Break("mia-members-ignore-the-ledger", "evaluate.py",
          '    if history(ledger) or any("subset" not in read for read in reads):', "    if True:",
          (E + "::test_mia_members_are_the_private_images_the_ledger_says_were_read",),
          "the MIA's members are the whole private split whatever the run read (a subset's members diluted)"),
    Break("mia-for-public-only-runs", "evaluate.py", "    if not reads:\n        return None\n",
          "    if not reads:\n        return private\n",
          (E + "::test_evaluate_writes_every_output_with_a_row_per_run",),
          "a run that never read the private split gets an MIA AUC against members it never saw"),
    # ------------------------------------------------------------ the downstream protocol and the recipe
    Break("protocol-holdout-from-the-head", "utils/evaluation/metrics.py",
          "holdout_images, holdout_labels = images[-protocol.holdout:], labels[-protocol.holdout:]",
          "holdout_images, holdout_labels = images[:protocol.holdout], labels[:protocol.holdout]",
          (P + "::test_the_holdout_is_the_generated_tail_and_the_test_set_is_scored_once_after_the_choice",),
          "the protocol chooses the epoch on samples it also trained on"),
    Break("protocol-test-chooses", "utils/evaluation/metrics.py",
          "curve.append(accuracy(forward, holdout_images, holdout_labels))",
          "curve.append(accuracy(forward, test_images, test_labels))", (P + "::test_the_test_set_chooses_nothing",),
          "the real test set chooses the reported epoch"),
    Break("recall-without-generated-radii", "utils/evaluation/metrics.py",
          '"recall": manifold_coverage(real, fake, knn_radii(fake, k))',
          '"recall": manifold_coverage(real, fake, knn_radii(real, k))', (P,),
          "recall measures generated samples with the real set's radii: collapse no longer shows"),
    Break("weight-average-not-restored", "utils/gan/steps.py",
          'self.recipe.load_state_dict(checkpoint["recipe"], checkpoint["generator"])', "pass",
          (T + "::test_weight_average_is_what_is_saved_for_sampling_and_is_restored_on_resume",),
          "a resumed teacher restarts its weight average from the live weights"),
    Break("adaptive-rung-not-logged-teacher", "utils/gan/steps.py",
          "return {} if self.recipe is None else self.recipe.log_fields()", "return {}",
          (T + "::test_weight_average_is_what_is_saved_for_sampling_and_is_restored_on_resume",),
          "the adaptive D-steps schedule climbs unseen: the metrics record no rung"),
    Break("adaptive-rung-not-logged-dp", "utils/privacy/dp.py",
          "return {} if self.recipe is None else self.recipe.log_fields()", "return {}",
          (F + "::test_weight_average_and_adaptive_d_steps_under_dp_resume_exactly_and_cost_no_privacy",),
          "under DP the adaptive D-steps schedule climbs unseen: the metrics record no rung"),
    Break("weight-average-not-saved", "utils/gan/steps.py", 'return {"generator": self.sampling_generator(), **live,',
          'return {"generator": self.generator, **live,',
          (T + "::test_weight_average_is_what_is_saved_for_sampling_and_is_restored_on_resume",),
          "the checkpoint's generator (what later stages sample) is the live generator, not the average"),
    # ------------------------------------------------------------ what ships (issue 12)
    Break("runtime-check-ignores-the-mean", "utils/compression/runtime.py",
          "\"ok\": finite and mean <= settings.mean_tolerance and ", "\"ok\": finite and ", ("tests/test_runtime.py",),
          "generator.onnx with a small systematic error (every pixel a little off) passes the artifact check"),
    Break("sweep-reuse-ignores-settings", "benchmarks/bench_compression.py", "        if wrong:\n",
          "        if False:\n",
          ("tests/test_deploy.py::test_sweep_writes_a_pareto_table_from_one_teacher_and_distillation_set",),
          "a continued sweep mixes in runs trained with other settings"),
    Break("sweep-reuse-compares-link-names", "benchmarks/bench_compression.py",
          "        return os.path.realpath(saved) == os.path.realpath(wanted)", "        return saved == wanted",
          ("tests/test_deploy.py::test_sweep_writes_a_pareto_table_from_one_teacher_and_distillation_set",),
          "a continued sweep given a `latest` link refuses its own finished points (the stage saved the link's run)"),
    # ------------------------------------------------------------ like for like, bit for bit (issue 26)
    Break("artifact-check-not-exact", "utils/compression/runtime.py", '"ok": exact and layers["ok"],',
          '"ok": layers["ok"],',
          ("tests/test_reference.py::test_verify_refuses_a_one_step_change_that_the_mean_lets_pass",),
          "the artifact check lets generator.onnx differ from its integer reference while the mean stays small"),
    Break("artifact-check-ignores-the-layer-check", "utils/compression/runtime.py",
          '"ok": exact and layers["ok"],', '"ok": exact,',
          ("tests/test_runtime.py::test_verify_refuses_an_artifact_whose_output_bias_is_off",
           "tests/test_reference.py::test_verify_refuses_a_one_step_change_that_the_mean_lets_pass"),
          "an integer program that does not compute the compact model (graph and reference sharing the error) ships"),
    Break("layer-check-ignores-violations", "utils/compression/reference.py",
          'ok = all(v["violations"] == 0 for v in layers.values()) and image_diff', "ok = image_diff",
          ("tests/test_reference.py::test_layer_check_refuses_every_one_step_change",),
          "a layer whose activations are a step or more from the model's away from any rounding boundary passes"),
    Break("layer-check-ignores-the-image", "utils/compression/reference.py",
          'for v in layers.values()) and image_diff <= IMAGE_TOLERANCE', "for v in layers.values())",
          ("tests/test_runtime.py::test_verify_refuses_an_artifact_whose_output_bias_is_off",),
          "to_image's scale or bias may be off in the program: only the integer layers are checked"),
    Break("layer-bound-a-whole-unit", "utils/compression/reference.py", "bounds[name] = 0.5 * layer.scale",
          "bounds[name] = 1.5 * layer.scale",
          ("tests/test_reference.py::test_verify_refuses_a_one_step_change_that_the_mean_lets_pass",),
          "the layer check's bound is wider than the bias rounding: a one-unit bias error of the program passes"),
    Break("layer-verdict-allows-any-neighbour", "utils/compression/reference.py",
          '"violations": int((distance > 0.5 + bound).sum())', '"violations": int((distance > 1.0 + bound).sum())',
          ("tests/test_reference.py::test_layer_verdict_allows_a_flip_only_at_a_rounding_boundary",),
          "an activation one step off passes anywhere, not only at a rounding boundary"),
    Break("graph-weight-zero-point-off-by-one", "utils/compression/runtime.py",
          "np.full(len(p.scale), p.weight_zero, np.uint8)", "np.full(len(p.scale), p.weight_zero + 1, np.uint8)",
          ("tests/test_reference.py::test_reference_matches_the_artifact_bit_for_bit",),
          "the graph's QLinearConv weight zero point is one step off the integer program's"),
    Break("runtime-tanh-kernel-in-the-graph", "utils/compression/runtime.py", "    return _tanh(g, y)\n",
          '    return g.node("Tanh", [y], "images")\n',
          ("tests/test_reference.py::test_reference_matches_the_artifact_bit_for_bit",),
          "the graph ends in ONNX Runtime's own Tanh kernel, which no eager reference reproduces bit for bit"),
    Break("reference-ignores-the-weight-zero-point", "utils/compression/reference.py",
          "_integer_conv(x, p.input_zero, p.weights, p.weight_zero, 1)",
          "_integer_conv(x, p.input_zero, p.weights, 128, 1)",
          ("tests/test_reference.py::test_a_one_step_change_of_any_shift_or_zero_point_breaks_the_match",),
          "the reference hard-codes the QLinearConv weight zero point: a graph with another one goes unnoticed"),
    Break("reference-ignores-the-shift", "utils/compression/reference.py",
          "_saturate(y / torch.tensor(p.quant_scale, dtype=torch.float32), p.zero, p.top)",
          "_saturate(y, p.zero, p.top)",
          ("tests/test_reference.py::test_a_one_step_change_of_any_shift_or_zero_point_breaks_the_match",),
          "the reference hard-codes block0's requantisation (scale 1): a graph with another shift goes unnoticed"),
    # block0's limbs (issue 26, latency at batch 1)
    Break("graph-limb-zero-point-off-by-one", "utils/compression/runtime.py",
          'g.uint8(f"{name}.limb_zero", p.limb_zero)', 'g.uint8(f"{name}.limb_zero", p.limb_zero + 1)',
          ("tests/test_reference.py::test_reference_matches_the_artifact_bit_for_bit",),
          "the graph's MatMulInteger zero point of block0's limbs is one step off the integer program's"),
    Break("graph-limb-shift-off-by-one", "utils/compression/runtime.py", "np.int64(2 ** shift)",
          "np.int64(2 ** (shift + 1))", ("tests/test_reference.py::test_reference_matches_the_artifact_bit_for_bit",),
          "the graph combines block0's limbs with shifts one bit off those it split them with"),
    Break("graph-block0-grid-not-clipped", "utils/compression/runtime.py", 'f"{name}.grid_clipped")',
          'f"{name}.grid_clipped")\n    x = g.node("Identity", [f"{name}.grid_scaled"], f"{name}.unclipped")',
          ("tests/test_reference.py::test_limb_sums_are_the_exact_integer_sums_and_the_artifact_equals_them_at_"
           "the_grids_edges",),
          "block0's grid is not clipped in the graph: a latent beyond +-15.87 wraps around in the limbs"),
    Break("reference-ignores-the-limb-zero-point", "utils/compression/reference.py", "(limb - p.limb_zero)",
          "(limb - 64)",
          ("tests/test_reference.py::test_a_one_step_change_of_any_shift_or_zero_point_breaks_the_match",),
          "the reference hard-codes the limbs' zero point: a graph with another one goes unnoticed"),
    Break("reference-ignores-the-limb-shifts", "utils/compression/reference.py", "for shift in p.limb_shifts:",
          "for shift in (0, 7, 14):",
          ("tests/test_reference.py::test_a_one_step_change_of_any_shift_or_zero_point_breaks_the_match",),
          "the reference hard-codes the limbs' shifts: a graph with other shifts goes unnoticed"),
    Break("block0-float64-by-default", "utils/compression/runtime.py", 'BLOCK0_SUMS = "limbs"',
          'BLOCK0_SUMS = "float64"',
          ("tests/test_runtime.py::test_integer_weights_inside_and_only_blocks_0_and_to_image_in_float",),
          "block0 falls back to float64 sums (twice the latency at batch 1) without anyone noticing"),
    Break("teacher-baseline-not-the-teacher", "utils/compression/runtime.py",
          "    size = save_runtime_artifact(model, path)\n",
          "    size = save_runtime_artifact(Generator(**model.model_args()).eval(), path)\n",
          ("tests/test_deploy.py::test_teacher_baseline_is_the_teachers_own_graph",),
          "the in-runtime baseline is a float generator of the teacher's widths, not the teacher"),
    Break("teacher-baseline-unchecked", "utils/compression/runtime.py",
          "    if not diff <= BASELINE_TOLERANCE:", "    if False:",
          ("tests/test_deploy.py::test_teacher_baseline_refuses_a_graph_that_is_not_the_teacher",),
          "a baseline graph that does not compute the teacher is used for every ratio"),
    Break("same-runtime-ratios-to-the-eager-teacher", "utils/compression/cost.py",
          "    in_runtime = baseline or rows.get(TEACHER_RUNTIME)", "    in_runtime = baseline or rows.get(TEACHER)",
          ("tests/test_deploy.py::test_like_for_like_rows_ratio_to_the_teacher_in_the_same_runtime",),
          "the headline ratios of generator.onnx are to the eager teacher again: part of the gain is the runtime's"),
    Break("sweep-ratios-to-the-eager-teacher", "benchmarks/bench_compression.py", ", runtime_names=entries)", ")",
          ("tests/test_deploy.py::test_sweep_writes_a_pareto_table_from_one_teacher_and_distillation_set",),
          "the sweep's points are compared with the eager teacher, not with its ONNX model"),
    Break("timings-not-interleaved", "utils/compression/cost.py",
          "    for round_ in progress_bar(range(rounds), desc=desc, leave=False, disable=desc is None):\n"
          "        for name, call in calls.items():\n",
          "    for name, call in calls.items():\n        for round_ in range(rounds):\n",
          ("tests/test_deploy.py::test_interleaved_speed_times_the_runs_in_turn",),
          "each model is timed in one block after the other: a change of load during the measurement skews ratios"),
    # ------------------------------------------------------------ your own images (issue 15)
    Break("private-fingerprint-ignores-file-list", "utils/data/datasets.py", "digest.update(list_fingerprint.encode())",
          "digest.update(b'')", (I + "::test_partition_fingerprint_covers_the_file_list",),
          "two different folders (or a changed one) give the same private fingerprint: the ledger would cover both"),
    Break("cache-ignores-file-list", "utils/data/folders.py",
          ' or meta.get("fingerprint") != listing.fingerprint:', ":",
          (I + "::test_a_changed_file_is_noticed_and_decoded_again",),
          "a changed folder is read from the stale decode cache"),
    Break("default-28-layout-changed", "models/shapes.py", "28: (256, 128, 64)", "28: (256, 128, 32)",
          (S + "::test_default_28_grey_models_keep_the_original_layout",),
          "the default 28x28 generator changes shape: existing checkpoints no longer load"),
    # ------------------------------------------------------------ several processes compute the one-process run
    Break("batchnorm-local-statistics", "utils/run/distributed.py", "        if uses_batch_stats and is_distributed():",
          "        if False:", (DIST + "::test_two_process_gan_steps_match_one_process",),
          "under torchrun the generator's BatchNorm normalises with each process's own half-batch statistics"),
    Break("gradients-not-averaged", "utils/run/distributed.py",
          "    return optimizer.register_step_pre_hook(hook) if is_distributed() else None", "    return None",
          (DIST + "::test_two_process_gan_steps_match_one_process",),
          "under torchrun each process steps on its own half-batch gradient: the copies drift apart"),
    Break("dp-noise-on-every-rank", "utils/run/distributed.py",
          "    wrapped[1].expected_batch_size = expected_batch_size / world_size()",
          "    wrapped[1].rank = 0\n    wrapped[1].expected_batch_size = expected_batch_size / world_size()",
          (DIST + "::test_dp_noise_added_once_per_step",),
          "under torchrun every process adds sigma*C noise: more noise than the ledger's mechanism, and a step "
          "that depends on the number of processes"),
    # ------------------------------------------------------------ the demo page (make_demo.py, demo/)
    Break("demo-check-set-not-samples-inputs", "utils/evaluation/web_demo.py",
          "fixed_inputs(shape, per_class=per_class)", "fixed_inputs(shape, per_class=per_class, seed=0)",
          (DEMO + "::test_demo_folder_holds_the_page_the_model_and_the_check_set_of_samples_png",),
          "the page's check set is not the latent vectors of samples.png"),
    Break("demo-expected-not-the-runtimes-images", "utils/evaluation/web_demo.py",
          '"expected": generate(session, z, labels)', '"expected": generate(session, z, labels[::-1].copy())',
          (DEMO + "::test_demo_folder_holds_the_page_the_model_and_the_check_set_of_samples_png",),
          "the images the page compares with are not the Python runtime's images of the check set"),
    Break("demo-card-epsilon-of-one-stage", "utils/evaluation/web_demo.py",
          '_epsilon_words(privacy["epsilon_total"]', '_epsilon_words(privacy["epsilon_this_stage"]',
          (DEMO + "::test_card_lines_state_the_total_epsilon_the_private_split_and_the_bytes",),
          "the page states one stage's epsilon, not the total over every stage's mechanism"),
    Break("demo-page-ignores-labels", "demo/demo.js", 'labels: new ort.Tensor("int64", labels, [n])',
          'labels: new ort.Tensor("int64", new BigInt64Array(n), [n])', (DEMO_PAGE + "[28-grey]",),
          "the browser generates every image as class 0, whatever the label"),
    Break("demo-page-draws-rgb-as-grey", "demo/demo.js", "(channels === 3 ? c : 0)", "(channels === 3 ? 0 : 0)",
          (DEMO_PAGE + "[32-rgb-4bit]",), "the canvas shows an RGB generator's first channel only"),
    Break("demo-grid-drops-a-tile", "demo/demo.js", "for (let i = 0; i < n; i++) {\n    const tile",
          "for (let i = 0; i < n - 1; i++) {\n    const tile", (DEMO_PAGE + "[28-grey]",),
          "the grid has one tile fewer than the images generated"),
    Break("demo-page-fetches-after-load", "demo/demo.js", "{ z, labels, expected } = state.check;",
          "{ z, labels } = state.check, expected = new Float32Array(await fetchBytes(check.expected));",
          (DEMO_PAGE + "[28-grey]",), "the exactness check fetches its images again: the page fails offline"),
    Break("demo-shown-difference-not-the-largest", "demo/demo.js", "max = Math.max(max, diff);", "max = diff;",
          (DEMO_PAGE + "[28-grey]",), "the page shows the last pixel's difference, not the largest"),
    Break("demo-verdict-ignores-the-pixel-share", "demo/demo.js", "over <= check.pixel_share * expected.length",
          "over >= 0", (DEMO_PAGE + "[28-grey]",),
          "the page calls images the same however many pixels differ by more than the tolerance"),
    # ------------------------------------------------------------ a released synthetic dataset (issue 29)
    Break("release-latents-tail-not-redrawn", "utils/gan/latents.py", "    if tail:  # torch makes the last 16",
          "    if False:  # torch makes the last 16", (GEN + "::test_numpy_latents_are_the_generators_own_draw",),
          "the numpy draw skips torch's second pass over the last 16 values: not torch's z when 16 does not divide "
          "the count"),
    Break("release-onnx-own-latent-draw", "generate.py",
          "z, labels = latents.sample_inputs(count, nz, num_classes, seed)",
          "z, labels = np.random.default_rng(seed).standard_normal((count, nz), np.float32), "
          "np.arange(count) % num_classes", (GEN_ONNX,),
          "the ONNX path draws its own latent vectors: its images are not the torch path's for the same seed"),
    Break("release-onnx-path-imports-torch", "generate.py", "import numpy as np\n\nfrom utils.data import synthetic",
          "import numpy as np\nimport torch  # noqa: F401\n\nfrom utils.data import synthetic", (GEN_ONNX,),
          "generate.py imports torch at the top: a generator.onnx alone cannot be released without torch"),
    Break("release-folders-in-name-order", "utils/data/synthetic.py", 'f"{label:0{width}d}-{name.replace(',
          'f"{name.replace(', (GEN_FORMATS,),
          "class folders named by the class alone: ImageFolder sorts them by name and gives back other labels"),
    Break("release-read-in-listing-order", "utils/data/synthetic.py",
          'return np.argsort([int(stem) for stem in stems], kind="stable")', "return np.arange(len(files))",
          (GEN + "::test_scoring_a_set_written_from_a_run_gives_that_runs_numbers",),
          "a set is scored in its folders' order (class by class), not the run's: FD's first samples and the "
          "protocol's hold-out are other images than the run's"),
    Break("release-card-epsilon-of-one-stage", "utils/evaluation/dataset_card.py",
          "epsilon = {epsilon_text(privacy['epsilon_total'])}, delta",
          "epsilon = {epsilon_text(privacy['epsilon_this_stage'])}, delta", (GEN_FORMATS,),
          "the card states the last stage's epsilon, not the total over every mechanism of the ledger"),
    Break("release-card-infinite-epsilon-not-said", "utils/evaluation/dataset_card.py",
          'if privacy["epsilon_total"] == "inf":', "if False:",
          (GEN + "::test_the_card_says_no_guarantee_plainly_for_a_non_private_run",),
          "a set from a generator with infinite epsilon gets a card that reads like a DP one"),
    Break("release-staged-before-checks", "generate.py",
          "    source = from_onnx(args) if args.onnx else from_run(args)\n",
          "    synthetic.staging_dir(os.path.join(args.out, STAGE))\n"
          "    source = from_onnx(args) if args.onnx else from_run(args)\n", (GEN_REFUSE,),
          "generate.py creates its directory before checking its input: a refusal leaves it behind"),
    Break("release-of-an-audit-run", "generate.py", "    if is_audit(ledger):", "    if False:", (GEN_REFUSE,),
          "an audit run's generator (canaries in its private data) is released"),
    Break("synthetic-image-shape-unchecked", "utils/data/synthetic.py",
          '        if found != image_shape:\n            raise UserError(f"{path}: the image is',
          '        if False:\n            raise UserError(f"{path}: the image is', (GEN_EVAL_REFUSE,),
          "a folder of images of another size or channel count is scored (or crashes) instead of refused"),
    Break("synthetic-npz-shape-unchecked", "utils/data/synthetic.py",
          '    if found != image_shape:\n        raise UserError(f"{path}: its images are',
          '    if False:\n        raise UserError(f"{path}: its images are', (GEN_EVAL_REFUSE,),
          "an .npz of images of another size is scored (or crashes) instead of refused"),
    Break("synthetic-classes-unchecked", "utils/data/synthetic.py", "    if found not in accepted:", "    if False:",
          (GEN_EVAL_REFUSE,), "a folder whose class folders are not the data's classes is scored with wrong labels"),
    Break("release-once-ignores-the-seed", "generate.py", 'ONCE_KEYS = ("generator", "seed", "num_samples",',
          'ONCE_KEYS = ("generator", "num_samples",',
          (GEN + "::test_once_writes_a_set_once_per_generator_seed_count_and_format",),
          "--once takes a set of another seed for this one and skips writing it"),
    # ------------------------------------------------------------ student options: --penalty params, --init-student
    Break("params-penalty-counts-macs", "utils/compression/slimming.py", '"params": ChannelCost(params=1.0, macs=0.0)',
          '"params": ChannelCost(params=1.0, macs=1.0)', SR_PENALTY,
          "--penalty params weighs the MACs too: it is the cost penalty, not the parameters the bytes count"),
    Break("cost-penalty-changed", "utils/compression/slimming.py", 'PENALTY_COSTS = {"cost": ChannelCost(),',
          'PENALTY_COSTS = {"cost": ChannelCost(macs=0.0),', SR_PENALTY,
          "--penalty cost no longer weighs parameters and MACs: existing cost runs change"),
    Break("step-ignores-params-penalty", "utils/compression/slimming.py", "weights = penalty_weights(G, penalty)",
          'weights = channel_costs(G) if penalty == "cost" else None', SR_PENALTY[1:],
          "the student's step thresholds --penalty params uniformly"),
    Break("recovery-starts-from-the-teacher", "train_student.py", " if init is None else build_generator(init)", "",
          (SR_STARTS, SR_KEEPS),
          "--init-student is ignored: the student starts from the teacher, its dead channels alive"),
    Break("recovery-discriminator-from-the-teacher", "train_student.py",
          '    if init is not None and "discriminator" in init:', "    if False:", (SR_STARTS,),
          "a recovery run's discriminator is the teacher's, not the init student's"),
    Break("recovery-norm-stats-not-kept", "train_student.py",
          'args.norm_stats = "frozen" if norm_stats_frozen(saved, teacher_checkpoint) else "batch"',
          'args.norm_stats = "batch"', (SR_KEEPS,),
          "a recovery run of a frozen-statistics student trains on batch statistics: the statistics it was pruned "
          "under move"),
    Break("recovery-conflicting-flags-accepted", "train_student.py", "    if conflicts:\n", "    if False:\n",
          (SR + "::test_flags_that_contradict_the_init_student_are_refused",),
          "--quant-bits, --width-mult or --init that contradict the init student are silently overridden"),
    Break("recovery-other-teacher-accepted", "train_student.py",
          '    if teacher is None or os.path.realpath(teacher) != os.path.realpath(teacher_checkpoint["run_dir"]):',
          "    if False:", (SR + "::test_a_student_of_another_teacher_is_refused",),
          "a student of another teacher is recovered on this distillation set"),
    Break("recovery-other-ledger-accepted", "train_student.py", '    if init["privacy"] != distill.ledger:',
          "    if False:", (SR + "::test_a_student_with_another_ledger_is_refused",),
          "a student whose privacy ledger is not the distillation set's is continued under the set's ledger"),
    Break("recovery-lineage-not-recorded", "train_student.py",
          'args.init_student = os.path.realpath(path) if os.path.isfile(path) else init["run_dir"]',
          "args.init_student = path",
          (SR + "::test_recovery_records_where_it_came_from_and_inherits_the_ledger",),
          "a recovery run's args name the link it was given (which moves), not the student run it started from"),
    Break("recovery-distill-set-not-its-own", "train_student.py", "DISTILL_DIR or own_set", "DISTILL_DIR",
          (SR_KEEPS,),
          "without --distill-dir a recovery run reads <out>/distill/latest, not its init student's set"),
    Break("recovery-resume-reads-the-init-student", "train_student.py",
          "load_inputs(args, resuming=checkpoint is not None)", "load_inputs(args)",
          (SR + "::test_a_resumed_recovery_run_needs_no_init_student_and_equals_the_uninterrupted_one",),
          "a resumed recovery run reads its --init-student again (and fails once that run is gone)"),
    # ------------------------------------------------------------ the student's own discriminator: --d-channels
    Break("student-d-channels-ignored", "train_student.py",
          '    if getattr(args, "d_channels", None):\n        return student, fresh', "    if False:\n        return "
          "student, fresh", (SD_CARRIED,),
          "--d-channels is ignored: the student, the compact model and the DP stage keep the teacher's discriminator"),
    Break("student-fresh-d-keeps-minibatch-std", "train_student.py", '"channels": list(widths), "minibatch_std": 0}',
          '"channels": list(widths)}', (SD_CARRIED,),
          "the student's fresh discriminator copies the teacher's minibatch std layer, which DP-SGD cannot train"),
    Break("student-d-init-teacher-with-d-channels-accepted", "train_student.py",
          '    if args.d_channels and args.d_init in ("teacher", "teacher-dp"):', "    if False:", (SD_REFUSED,),
          "an explicit --d-init teacher beside --d-channels is silently overridden instead of refused"),
    Break("student-d-channels-checked-late", "train_student.py",
          "        fresh_discriminator(args.d_channels, teacher_checkpoint)  # widths", "        pass  # widths",
          (SD_REFUSED,), "--d-channels that do not fit the images are refused only after the run directory exists"),
    Break("recovery-d-channels-ignored", "train_student.py", '    if getattr(args, "d_channels", None):\n',
          '    if init is None and getattr(args, "d_channels", None):\n',
          (SD + "::test_an_init_student_with_d_channels_gets_a_fresh_discriminator",),
          "--init-student with --d-channels keeps the init student's discriminator, not one of those widths"),
    Break("student-resume-discriminator-afresh", "train_student.py",
          "        return build_generator(checkpoint), build_discriminator(checkpoint)",
          "        return build_generator(checkpoint), fresh_discriminator(checkpoint['model_args']['discriminator']"
          "['channels'], teacher_checkpoint)",
          (SD + "::test_resume_keeps_the_widths_and_equals_the_uninterrupted_run",),
          "a resumed student rebuilds its discriminator of the same widths afresh, losing what it had learnt"),
    Break("student-fresh-d-unseeded", "train_student.py", "        return Discriminator(**shape)",
          "        torch.seed()\n        return Discriminator(**shape)", (SD_SEEDED,),
          "the fresh discriminator's weights do not follow --seed"),
    Break("student-default-d-not-the-teachers", "train_student.py",
          'args.d_init = "scratch" if args.d_channels else "teacher"', 'args.d_init = "scratch"', (SD_SEEDED,),
          "without --d-channels the student no longer starts from the teacher's discriminator"),
    Break("compact-drops-the-students-discriminator", "compress_student.py",
          '    if "discriminator" in student_checkpoint and "discriminator" in student_checkpoint["model_args"]:',
          "    if False:", (SD_CARRIED,),
          "the compact checkpoint leaves out the student's discriminator: the DP stage trains a default-width one"),
    Break("fine-tune-fresh-discriminator", "fine_tune.py",
          '    if "discriminator" in source:\n        D = build_discriminator(source)',
          "    if False:\n        D = build_discriminator(source)", (SD_CARRIED,),
          "fine_tune.py trains a fresh discriminator of the compact run's widths instead of the student's trained one"),
    # ------------------------------------------------------------ the teacher's narrow discriminator: --dp-d-channels
    Break("dp-d-own-fakes", "utils/gan/steps.py",
          "side.optimizer, loss_of, real, real_labels, fake, fake_labels)",
          "side.optimizer, loss_of, real, real_labels, G(*local_random_inputs(G, len(real), rng, real.device), "
          ").detach(), fake_labels)", (AUX_SAME, AUX_STEP),
          "the narrow discriminator gets fakes of its own: extra draws change the teacher, and it sees other images"),
    Break("dp-d-own-augmentation", "utils/gan/steps.py",
          "side.optimizer, loss_of, real, real_labels, fake, fake_labels)",
          "side.optimizer, loss_of, recipe.augment(real), real_labels, recipe.augment(fake), fake_labels)",
          (AUX_SAME, AUX_STEP),
          "the narrow discriminator draws augmentations of its own: the teacher's recipe stream moves, views differ"),
    Break("dp-d-other-loss", "utils/gan/steps.py", "side.optimizer, loss_of, real,", "side.optimizer, d_loss, real,",
          (AUX_STEP,), "the narrow discriminator trains on the non-saturating loss whatever D's (--loss hinge)"),
    Break("dp-d-feeds-the-generator", "utils/gan/steps.py",
          'self.losses["g_loss"] = nonprivate_generator_step(G, D,',
          'self.losses["g_loss"] = nonprivate_generator_step(G, self.side.forward if self.side else D,',
          (AUX_IDENTICAL,), "the generator trains against the narrow discriminator instead of D"),
    Break("dp-d-outside-precision", "utils/gan/steps.py",
          "optimizers[\"dp_d\"], precision.wrap(dp_discriminator))", "optimizers[\"dp_d\"])",
          (AUX_IDENTICAL,), "under bf16 the narrow discriminator runs in float32, not in D's precision"),
    Break("dp-d-not-channels-last", "utils/gan/steps.py", "            precision.prepare(dp_discriminator)\n", "",
          (AUX_IDENTICAL,), "under bf16 + channels-last the narrow discriminator keeps the default memory format"),
    Break("dp-d-not-saved", "utils/gan/steps.py",
          "side = {DP_DISCRIMINATOR: self.side.network} if self.side is not None else {}", "side = {}",
          (AUX_SAME,), "the checkpoint (and every snapshot) leaves the narrow discriminator out"),
    Break("dp-d-lr-not-ds", "train_teacher.py", "torch.optim.Adam(narrow.parameters(), lr_d, betas=betas)",
          "torch.optim.Adam(narrow.parameters(), args.lr, betas=(0.5, 0.999))", (AUX_SAME,),
          "the narrow discriminator's Adam ignores --lr-d and --beta2"),
    Break("dp-d-keeps-minibatch-std", "train_teacher.py", "Discriminator(channels=widths, minibatch_std=0,",
          "Discriminator(channels=widths, minibatch_std=args.minibatch_std,", (AUX_SAME, AUX_SEEDED),
          "the narrow discriminator copies D's minibatch std layer, which the DP stage's DP-SGD cannot train"),
    Break("dp-d-unseeded", "train_teacher.py", "        torch.manual_seed(args.seed + DP_DISCRIMINATOR_SEED_OFFSET)\n",
          "", (AUX_SEEDED,), "the narrow discriminator's initial weights do not follow --seed"),
    Break("dp-d-draws-from-the-global-generator", "train_teacher.py", "    with torch.random.fork_rng(devices=[]):",
          "    if True:", (AUX_SEEDED,),
          "building the narrow discriminator reseeds the global generator: every later global draw changes"),
    Break("dp-d-afresh-on-resume", "train_teacher.py",
          "        return build_discriminator(checkpoint, DP_DISCRIMINATOR) if DP_DISCRIMINATOR in checkpoint else None",
          "        checkpoint = None", (AUX_RESUME,),
          "a resumed teacher starts its narrow discriminator afresh, losing what it had learnt"),
    Break("dp-d-with-dp-accepted", "train_teacher.py", "    if args.dp and args.dp_d_channels:", "    if False:",
          (AUX_REFUSED,), "--dp-d-channels beside --dp is silently ignored instead of refused"),
    Break("dp-d-widths-checked-late", "train_teacher.py", "        build_dp_discriminator(args, None, split)\n", "",
          (AUX_REFUSED,), "--dp-d-channels that do not fit the images are refused only after the run directory exists"),
    Break("student-teacher-dp-ignored", "train_student.py", '    if args.d_init == "teacher-dp":\n        return',
          '    if False:\n        return', (AUX_CHAIN,),
          "--d-init teacher-dp is ignored: the student, the compact run and the DP stage get the teacher's wide one"),
    Break("student-teacher-dp-without-one-accepted", "train_student.py",
          'if not resuming and args.d_init == "teacher-dp" and DP_DISCRIMINATOR not in', 'if False and', (AUX_REFUSED,),
          "--d-init teacher-dp from a teacher without a narrow discriminator fails late, with a traceback"),
    Break("student-teacher-dp-with-d-channels-accepted", "train_student.py",
          'args.d_init in ("teacher", "teacher-dp"):', 'args.d_init in ("teacher",):', (AUX_REFUSED,),
          "--d-init teacher-dp beside --d-channels is silently overridden instead of refused"),
]

IGNORED = shutil.ignore_patterns(".venv", "checkpoints", ".git", "__pycache__", ".pytest_cache", "*.pyc", "node_modules")
# installed, not source: the copy links to them instead of copying (demo/node_modules is ~150 MB)
LINKED = ("demo/node_modules",)


def run_tests(copy: str, tests) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    return subprocess.run(command, cwd=copy, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def apply_break(copy: str, item: Break) -> str:
    """The verdict for one break: the tests run with the break applied, the file restored afterwards."""
    path = os.path.join(copy, item.file)
    original = open(path).read()
    count = original.count(item.old)
    if count != 1:
        return "pattern not found" if count == 0 else f"pattern found {count} times"
    with open(path, "w") as handle:
        handle.write(original.replace(item.old, item.new))
    try:
        code = run_tests(copy, item.tests)
    finally:
        with open(path, "w") as handle:
            handle.write(original)
    return {0: "NOT CAUGHT", 1: "caught", 5: "error (no tests selected)"}.get(code, f"error (pytest exit {code})")


def main(names) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    chosen = [b for b in BREAKS if not names or any(n in b.name for n in names)]
    if not chosen:  # else pytest, given no selection, would run the whole suite
        print(f"no break's name contains any of {names}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="break-check-") as temp:
        copy = os.path.join(temp, "repo")
        shutil.copytree(root, copy, ignore=IGNORED, symlinks=True)
        for path in LINKED:
            if os.path.isdir(os.path.join(root, path)):
                os.symlink(os.path.join(root, path), os.path.join(copy, path))
        selections = sorted({test for item in chosen for test in item.tests})
        if run_tests(copy, selections) != 0:
            print("the selected tests fail on the unbroken code: fix them first", file=sys.stderr)
            return 2
        width = max(len(b.name) for b in chosen)
        missed = 0
        for item in chosen:
            verdict = apply_break(copy, item)
            missed += verdict != "caught"
            print(f"{item.name:<{width}}  {verdict:<18}  {item.meaning}", flush=True)
    print(f"{len(chosen) - missed} of {len(chosen)} breaks caught")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
