"""The scikit-learn estimator contract, checked once for every estimator."""

from __future__ import annotations

import jax
from sklearn.utils.estimator_checks import parametrize_with_checks

from kpms_estimators import ARHMM, AlloKeypointSLDS, KeypointSLDS

TEMPORAL_CONTEXT = (
    "a temporal model's output for a frame depends on its neighbours and their order in time, "
    "so predicting on a subset or a permutation of the frames legitimately changes the results"
)

ESTIMATORS = [
    ARHMM(n_states=5, n_iter=2, random_state=0),
    # 2D path: X is (n_frames, n_keypoints * 2), keypoint-major
    KeypointSLDS(n_dims=2, n_states=5, n_ar_iter=1, n_iter=2, n_apply_iter=1, n_marginal_samples=1, random_state=0),
    # no AR-only stage: one sweep type fewer to compile in every check that fits (tested in test_allo_*)
    AlloKeypointSLDS(n_dims=2, n_states=5, n_ar_iter=0, n_iter=2, n_apply_iter=1, n_marginal_samples=1,
                     random_state=0),
]


#: Checks whose synthetic X has 2, 3 or 5 columns. A KeypointSLDS (or AlloKeypointSLDS) 2D X holds the
#: n_keypoints x n_dims coordinates of at least 2 keypoints, so with n_dims=2 these
#: inputs are rejected with a ValueError that names the column count. The contracts
#: they test (fit returns self, parameters untouched, pickling, idempotent fit,
#: n_features_in_, dtypes, NaN/inf rejection, read-only input, transformer output)
#: are checked on valid keypoint data in tests/test_keypoint_slds.py.
KEYPOINT_SHAPES = (
    "the check's X has 2, 3 or 5 columns, which are not the coordinates of >= 2 keypoints in 2D"
)
KEYPOINT_SHAPE_CHECKS = [
    "check_dict_unchanged", "check_dont_overwrite_parameters", "check_estimators_dtypes",
    "check_estimators_fit_returns_self", "check_estimators_nan_inf", "check_estimators_overwrite_params",
    "check_estimators_pickle", "check_estimators_pickle(readonly_memmap=True)",
    "check_f_contiguous_array_estimator", "check_fit2d_predict1d", "check_fit_check_is_fitted",
    "check_fit_idempotent", "check_fit_score_takes_y", "check_n_features_in", "check_pipeline_consistency",
    "check_readonly_memmap_input", "check_transformer_data_not_an_array", "check_transformer_general",
    "check_transformer_general(readonly_memmap=True)", "check_transformer_preserve_dtypes",
]


def expected_failures(estimator) -> dict[str, str]:
    failures = {
        "check_methods_sample_order_invariance": TEMPORAL_CONTEXT,
        "check_methods_subset_invariance": TEMPORAL_CONTEXT,
    }
    if isinstance(estimator, KeypointSLDS):
        failures.update(dict.fromkeys(KEYPOINT_SHAPE_CHECKS, KEYPOINT_SHAPES))
    return failures


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=expected_failures)
def test_sklearn_contract(estimator, check):
    try:
        check(estimator)
    finally:
        if isinstance(estimator, KeypointSLDS):
            # Free the compiled programs: the keypoint checks fit on data of several shapes, and every
            # XLA:CPU executable holds memory maps; a whole-suite process otherwise runs into
            # vm.max_map_count (65530) and segfaults in a later compilation.
            jax.clear_caches()
