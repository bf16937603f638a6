"""Every RELIABILITY.md test id that issue 8 requires maps to tests that `make test` runs and that
assert its pass criterion (../shared/RELIABILITY.md is outside the repository, so the ids are
written here). Entries are `file::function` or `file::Class::method`; a parametrized test is
named without its ids. Read MAP to find the test of an id; this test keeps it from rotting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MAP: dict[str, list[str]] = {
    # -- A. checkpoint / resume --------------------------------------------------------------
    "A1": [
        "tests/e2e/test_train.py::test_resume_is_bitwise_exact",  # losses, grad norms, all state files
        "tests/distributed/test_resume.py::test_resume_is_bitwise_exact",  # 2 ranks: fsdp ddp tp zero2 zero3
    ],
    "A2": [
        "tests/e2e/test_train.py::test_resume_without_rng_state_diverges",  # (a)
        "tests/e2e/test_train.py::test_resume_with_a_restarted_lr_schedule_diverges",  # (b)
        "tests/e2e/test_train.py::test_resume_without_data_position_diverges",  # (c)
    ],
    "A3": [
        "tests/unit/test_data_loader.py::test_mid_shard_resume_no_gap_no_duplicate_same_order",
        "tests/unit/test_data_loader.py::test_schedule_changes_weights_without_dropping_or_duplicating",
    ],
    "A4": [
        "tests/e2e/test_train.py::test_kill_9_between_data_files_and_commit_resumes_from_the_previous",
        "tests/e2e/test_train.py::test_incomplete_checkpoint_is_ignored_and_cleaned",
        "tests/unit/test_checkpoint.py::test_uncommitted_directory_is_not_a_checkpoint",
    ],
    "A5": [
        "tests/distributed/test_faults.py::test_kill_9_of_one_rank_restarts_from_latest_and_ends_bitwise"
    ],
    "A6": [
        "tests/e2e/test_async_save.py::test_crash_before_async_commit_keeps_latest_and_resumes_bitwise",
        "tests/unit/test_checkpoint.py::test_async_save_commits_only_after_the_write_and_prunes_after_commit",
    ],
    "A7": [
        "tests/unit/test_retention_and_resume_path.py::test_keep_2_over_10_saves_with_a_failed_delete_leaves_exactly_2",
        "tests/e2e/test_train.py::test_retention_keeps_newest_and_latest",
        "tests/unit/test_config.py::test_cross_field_errors_name_keys",  # checkpoint.keep=1 refused
    ],
    "A8": [
        "tests/distributed/test_resume.py::test_fsdp_checkpoint_saved_at_dp2_loads_at_dp1",  # vocab 257
        "tests/distributed/test_reshard.py::test_zero3_checkpoint_round_trips_through_other_engines",
        "tests/distributed/test_reshard.py::test_next_step_loss_after_zero3_checkpoint_on_other_topology",
        "tests/unit/test_data_loader.py::test_dp2_slices_concatenate_to_dp1_and_resume_across_dp",
    ],
    "A9": [
        "tests/e2e/test_train.py::test_corrupt_checkpoint_is_refused_before_loading",  # flipped byte
        "tests/unit/test_checkpoint.py::test_verify_names_missing_truncated_and_extra_files",
        "tests/e2e/test_export.py::test_flipped_byte_makes_generate_and_export_fail_naming_the_file",
    ],
    "A10": [
        "tests/e2e/test_train.py::test_resume_required_without_checkpoint_fails_naming_path",
        "tests/unit/test_retention_and_resume_path.py::test_mistyped_checkpoint_path_fails_naming_it",
        "tests/unit/test_checkpoint.py::test_fresh_start_is_logged_once_at_warning_by_rank_0_only",
    ],
    "A11": [
        "tests/e2e/test_train.py::test_changed_model_shape_is_refused_on_resume",
        "tests/unit/test_retention_and_resume_path.py::test_changed_tokenizer_refused_on_resume_before_loading",
        "tests/e2e/test_data_resume.py::test_swapped_source_paths_refused_naming_both",  # dataset fingerprint
        "tests/e2e/test_data_resume.py::test_allow_change_trains_logs_and_maps_positions_by_name",  # override
        "tests/unit/test_resume_changes.py::test_changed_keys_are_named_with_old_and_new",
    ],
    # -- B. fault handling -------------------------------------------------------------------
    "B1": [
        "tests/e2e/test_train.py::test_nan_loss_stops_before_the_update_and_saves_nothing",
        "tests/distributed/test_nan_policy.py::test_nan_grad_on_one_rank_every_two_rank_strategy",
        "tests/distributed/test_nan_policy.py::test_nan_grad_on_one_rank_tp_fsdp_four_ranks",
        "tests/distributed/test_nan_policy.py::test_nan_grad_on_one_rank_aborts_every_rank_through_train",
    ],
    "B2": [
        "tests/e2e/test_nan_policy.py::test_loss_spike_is_skipped_and_the_detector_survives_a_resume"
    ],
    "B3": [
        "tests/e2e/test_train.py::test_fp16_overflow_skips_step_halves_scale_and_logs",
        "tests/distributed/test_engine.py::test_fp16_overflow_skips_the_step_and_halves_the_scale",
        "tests/distributed/test_engine.py::test_fp16_consecutive_overflows_at_min_scale_abort",
        "tests/distributed/test_fp16.py::test_overflow_on_one_rank_skips_the_step_on_all",
        "tests/distributed/test_fp16.py::test_deepspeed_fp16_skips_halves_and_aborts_at_the_floor",  # skips w/o oneDNN fp16
    ],
    "B4": [
        "tests/distributed/test_faults.py::test_hung_rank_makes_every_rank_exit_with_stacks",  # + flight records, diagnosis
        "tests/unit/test_observe.py::test_watchdog_writes_the_flight_record_before_its_deadline_and_removes_a_near_miss",
        "tests/unit/test_observe.py::test_diagnosis_names_a_rank_that_wrote_nothing_and_a_hang_inside_the_collective",
    ],
    "B5": [
        "tests/distributed/test_faults.py::test_sigterm_to_the_launcher_saves_once_and_resumes_bitwise"
    ],
    "B6": [
        "tests/distributed/test_faults.py::test_sigusr1_to_one_worker_stops_every_rank_and_a_second_signal_spares_the_save"
    ],
    "B7": [
        "tests/distributed/test_faults.py::test_sigusr1_to_the_launcher_leaves_no_worker_behind",
        "tests/distributed/test_faults.py::test_sigterm_to_the_launcher_saves_once_and_resumes_bitwise",
    ],
    "B8": [  # CPU tier: rank 1 slowed by faults.slow_ms (> 2x its lead), named by step 6 of 8
        "tests/distributed/test_observe.py::test_slow_rank_is_named_a_straggler_in_the_log_metrics_and_summary",
        "tests/distributed/test_faults.py::test_healthy_run_names_no_straggler_and_makes_no_profile",
        "tests/unit/test_observe.py::test_a_rank_slow_three_checks_in_a_row_is_named_with_host_and_cause",
    ],
    # -- C. data path ------------------------------------------------------------------------
    "C1": [
        "tests/unit/test_data_shards.py::test_truncated_shard_named_at_startup",
        "tests/unit/test_data_shards.py::test_truncated_ipc_footer_named_even_if_manifest_agrees",
        "tests/e2e/test_data_errors.py::test_truncated_shard_refused",  # no step, no checkpoint
        "tests/unit/test_prepare.py::test_truncated_input_file_named",  # parquet
    ],
    "C2": [
        "tests/e2e/test_data_errors.py::test_checksum_mismatch_refused",
        "tests/unit/test_data_shards.py::test_rotted_byte_with_mtime_restored_stops_the_loader",
    ],
    "C3": [
        "tests/unit/test_data_shards.py::test_missing_shard_file_named",
        "tests/unit/test_data_shards.py::test_missing_manifest_names_source_and_path",
        "tests/unit/test_data_shards.py::test_empty_source_error_or_warning_with_renormalised_weights",
        "tests/e2e/test_data_errors.py::test_missing_source_dir_names_source",
        "tests/unit/test_prepare.py::test_empty_glob_missing_input_and_bad_lines_named",
    ],
    "C4": [
        "tests/unit/test_config.py::test_bad_weights_refused",
        "tests/unit/test_config.py::test_all_zero_weights_refused",
        "tests/e2e/test_data_errors.py::test_nan_inf_all_zero_weights_refused",
        "tests/unit/test_data_loader.py::test_zero_weight_disabled_and_tiny_weight_warns",
        "tests/unit/test_data_loader.py::test_mixture_shares_within_3_sigma_over_10k_samples",
        "tests/unit/test_data_loader.py::test_realized_token_shares_match_weights",
    ],
    "C5": [
        "tests/unit/test_data_shards.py::test_schema_drift_names_shard_and_diff",
        "tests/e2e/test_data_errors.py::test_schema_drift_refused",
    ],
    "C6": [
        "tests/unit/test_data_shards.py::test_token_id_beyond_vocab_names_shard_and_row",
        "tests/unit/test_data_shards.py::test_negative_token_id_names_shard_and_row",
        "tests/unit/test_data_shards.py::test_dtype_too_narrow_for_vocab",
        "tests/e2e/test_data_errors.py::test_token_id_out_of_range_refused_naming_row",
    ],
    "C7": [
        "tests/unit/test_doc_filter.py::test_long_document_policies_counted",
        "tests/unit/test_doc_filter.py::test_split_rows_read_through_the_loader_never_exceed_limits",
        "tests/unit/test_sft_data.py::test_overlong_drop_truncate_error",  # chat conversations
    ],
    "C8": [
        "tests/unit/test_doc_filter.py::test_repetitive_and_blank_documents_dropped_counted_and_logged"
    ],
    "C9": ["tests/unit/test_data_loader.py::test_same_seed_any_worker_count_identical_batches"],
    # -- D. config validation ----------------------------------------------------------------
    "D1": [
        "tests/unit/test_config_early.py::test_refused_before_any_process_group_or_device_naming_every_key",
        "tests/unit/test_config_early.py::test_no_cuda_context_no_process_group_no_run_dir",
    ],
    "D2": [
        "tests/unit/test_config_early.py::test_refused_before_any_process_group_or_device_naming_every_key",
        "tests/unit/test_config.py::test_cross_field_errors_name_keys",
    ],
    "D3": [
        "tests/unit/test_config_early.py::test_refused_before_any_process_group_or_device_naming_every_key",
        "tests/unit/test_config.py::test_validation_survives_python_O",
        "tests/unit/test_model.py::test_impossible_shapes_name_keys",
    ],
    "D4": [
        "tests/unit/test_config_early.py::test_unset_mandatory_key_fails_at_resolve_naming_its_path",
        "tests/unit/test_config.py::test_wrong_type_fails_at_compose_with_key_path",
        "tests/unit/test_config.py::test_unknown_key_fails_at_compose",
    ],
    "D5": [
        "tests/distributed/test_meta_build.py::test_dry_run_agrees_with_the_analytic_plan",
        "tests/distributed/test_meta_build.py::test_plan_cli_dry_run_adds_its_figures_to_the_json_line",
    ],
    # -- E. security -------------------------------------------------------------------------
    "E1": [
        "tests/unit/test_safeload.py::test_static_check_catches_unsafe_loads",
        "tests/unit/test_safeload.py::test_framework_has_no_unrestricted_unpickling",
    ],
    "E2": [
        "tests/unit/test_safeload.py::test_planted_payload_runs_nothing_on_resume_or_load_model",
        "tests/unit/test_safeload.py::test_planted_metadata_runs_nothing_in_generate_and_export_cli",
        "tests/unit/test_checkpoint.py::test_deepspeed_format_checkpoint_is_refused_before_anything_is_unpickled",
    ],
    "E3": [
        "tests/unit/test_torch_floor.py::test_an_older_torch_is_refused_naming_version_and_fix",
        "tests/unit/test_torch_floor.py::test_importing_the_package_checks_the_installed_torch",
        "tests/unit/test_lock.py::test_every_declared_dependency_is_pinned_within_its_range",
    ],
    "E4": [
        "tests/e2e/test_wandb.py::test_api_key_is_written_nowhere",
        "tests/unit/test_cli.py::test_train_main_refuses_a_secret_before_anything_runs",
        "tests/unit/test_cli.py::test_no_schema_has_a_secret_looking_key",
    ],
}

# Issue 8 "Done when", with C7 and C8 (the prepare policies were added)
REQUIRED = (
    [f"A{i}" for i in range(1, 12)]
    + [f"B{i}" for i in range(1, 9)]  # B8: issue 18
    + [f"C{i}" for i in range(1, 10)]
    + [f"D{i}" for i in range(1, 6)]
    + [f"E{i}" for i in range(1, 5)]
)


def defined_tests(path: Path) -> set[str]:
    """`function` and `Class::method` names of the test functions a file defines."""
    names = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names |= {
                f"{node.name}::{m.name}"
                for m in node.body
                if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef) and m.name.startswith("test")
            }
    return names


def test_every_required_id_has_a_test():
    assert [i for i in REQUIRED if not MAP.get(i)] == []
    assert sorted(set(MAP) - set(REQUIRED)) == []  # an id here that is not in RELIABILITY's list


@pytest.mark.parametrize("rid", sorted(MAP))
def test_every_entry_names_an_existing_test(rid):
    missing = []
    for entry in MAP[rid]:
        file, _, name = entry.partition("::")
        path = ROOT / file
        if not name or not path.is_file() or name not in defined_tests(path):
            missing.append(entry)
    assert missing == [], f"{rid}: no such test (renamed or moved? update MAP)"


def test_the_checker_sees_a_missing_name(tmp_path):
    f = tmp_path / "test_x.py"
    f.write_text("def test_a():\n    pass\n\nclass TestB:\n    def test_c(self):\n        pass\n")
    assert defined_tests(f) == {"test_a", "TestB::test_c"}
