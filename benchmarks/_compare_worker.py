"""One side of ``compare_reference.py``: run the keypoint-MoSeq pipeline of one implementation on one dataset.

    python _compare_worker.py {ours,reference} DATA.npz OUT.json [--new NEW.npz] [settings as JSON]

Runs in its own process (the reference in its own virtual environment): import,
format + PCA + init, AR-only stage, full stage, syllables of the training data,
apply to new data (first call and again), syllable marginals. Every stage is
announced on stderr as ``STAGE <name>`` before it starts, so that the parent can
say where a process that ran out of time was. The results (timings, peak RSS,
syllables per recording) go to OUT.json.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

T_START = time.perf_counter()

import numpy as np  # noqa: E402

from bench_data import read  # noqa: E402  (same folder)


def stage(name):
    print(f"STAGE {name}", file=sys.stderr, flush=True)


def main():
    impl, data_path, out_path = sys.argv[1:4]
    settings = json.loads(sys.argv[4])
    new_path = settings.get("new_data")
    names, bodyparts, anterior, posterior, coords, confs, _ = read(data_path)
    result = {"impl": impl, "settings": settings}

    stage("import")
    start = time.perf_counter()
    side = Ours(settings) if impl == "ours" else Reference(settings)
    result["import_s"] = time.perf_counter() - start
    result["versions"] = side.versions

    stage("init")
    start = time.perf_counter()
    data, metadata, model = side.init(coords, confs, bodyparts, anterior, posterior)
    result["init_s"] = time.perf_counter() - start
    result["sigmasq_loc_own_estimate"] = side.own_sigmasq_loc(data)

    for stage_name, kappa, n_sweeps, ar_only in (
        ("ar_only", settings["ar_kappa"], settings["n_ar_iter"], True),
        ("full", settings["kappa"], settings["n_iter"], False),
    ):
        model = side.api.update_hypparams(model, kappa=kappa)
        stage(f"{stage_name} first sweep")
        start = time.perf_counter()
        model = side.fit(model, data, metadata, 1, ar_only)
        first = time.perf_counter() - start
        stage(f"{stage_name} steady sweeps")
        start = time.perf_counter()
        model = side.fit(model, data, metadata, n_sweeps - 1, ar_only)
        steady = (time.perf_counter() - start) / max(n_sweeps - 1, 1)
        result[f"{stage_name}_first_sweep_s"] = first
        result[f"{stage_name}_steady_s_per_sweep"] = steady
        result[f"{stage_name}_compile_s"] = first - steady

    stage("syllables")
    result["syllables"] = {k: np.asarray(v).astype(int).tolist() for k, v in side.syllables(model, metadata).items()}

    if new_path:
        new_names, _, _, _, new_coords, new_confs, _ = read(new_path)
        new_data, new_metadata = side.format(new_coords, new_confs, bodyparts)
        for label in ("first", "steady"):
            stage(f"apply {label}")
            start = time.perf_counter()
            side.apply(model, new_data, new_metadata, settings["n_apply_iter"])
            result[f"apply_{label}_s"] = time.perf_counter() - start

    if settings.get("marginals"):
        stage("marginals")
        start = time.perf_counter()
        side.marginals(model, data, metadata, settings["marginals"])
        result["marginals_s"] = time.perf_counter() - start

    result["total_s"] = time.perf_counter() - T_START
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    result["device_peak_gb"] = _device_peak_gb()
    result["versions"].update(_device_info())
    stage("done")
    with open(out_path, "w") as f:
        json.dump(result, f)


class Ours:
    def __init__(self, settings):
        import kpms_estimators
        import kpms_estimators.fitting as api

        self.api, self.settings = api, settings
        self.versions = {"kpms_estimators": kpms_estimators.__version__, **_jax_versions()}

    def format(self, coords, confs, bodyparts):
        return self.api.format_data(coords, confs, bodyparts=bodyparts, use_bodyparts=bodyparts)

    def init(self, coords, confs, bodyparts, anterior, posterior):
        s = self.settings
        data, metadata = self.format(coords, confs, bodyparts)
        ends = dict(anterior_idxs=[bodyparts.index(a) for a in anterior],
                    posterior_idxs=[bodyparts.index(p) for p in posterior])
        # the reference's path (below): a standalone PCA on all valid frames, passed to init_model
        # (init_model's own PCA leaves out frames with a low-confidence point: another PCA)
        pca = self.api.fit_pca(**data, **ends)
        model = self.api.init_model(
            data, seed=s["seed"], pca=pca, **ends,
            trans_hypparams={"num_states": s["n_states"], "kappa": s["ar_kappa"]},
            ar_hypparams={"latent_dim": s["latent_dim"], "nlags": s["n_lags"]},
            cen_hypparams={"sigmasq_loc": s["sigmasq_loc"]} if s.get("sigmasq_loc") else None,
            reference_compat=s.get("reference_compat", False),
        )
        return data, metadata, model

    def own_sigmasq_loc(self, data):
        """This implementation's estimate (recorded next to the value both sides were given)."""
        return float(self.api.estimate_sigmasq_loc(data["Y"], data["mask"], filter_size=30))

    def fit(self, model, data, metadata, n_sweeps, ar_only):
        if n_sweeps <= 0:
            return model
        return self.api.fit_model(model, data, metadata, num_iters=n_sweeps, ar_only=ar_only,
                                  save_every_n_iters=None, generate_progress_plots=False)[0]

    def syllables(self, model, metadata):
        return {k: v["syllable"] for k, v in self.api.extract_results(model, metadata).items()}

    def apply(self, model, data, metadata, n_iter):
        return self.api.apply_model(model, data, metadata, num_iters=n_iter, save_results=False)

    def marginals(self, model, data, metadata, kwargs):
        return self.api.estimate_syllable_marginals(model, data, metadata, **kwargs)


class Reference:
    def __init__(self, settings):
        stand_ins = _import_stand_ins()
        import keypoint_moseq as kpms

        self.api, self.settings = kpms, settings
        self.project = tempfile.mkdtemp(prefix="kpms_reference_")
        self.versions = {"keypoint_moseq": getattr(kpms, "__version__", "?"), **_jax_versions()}
        if stand_ins:
            self.versions["stand_ins"] = stand_ins

    def format(self, coords, confs, bodyparts):
        return self.api.format_data(coords, confs, **self.config)

    def init(self, coords, confs, bodyparts, anterior, posterior):
        import jax

        s, kpms = self.settings, self.api
        kpms.setup_project(self.project, bodyparts=bodyparts, use_bodyparts=bodyparts, skeleton=[],
                           video_dir=self.project, overwrite=True)
        kpms.update_config(self.project, anterior_bodyparts=anterior, posterior_bodyparts=posterior,
                           latent_dim=s["latent_dim"], num_states=s["n_states"], nlags=s["n_lags"],
                           kappa=s["ar_kappa"], **({"sigmasq_loc": s["sigmasq_loc"]} if s.get("sigmasq_loc") else {}))
        self.config = kpms.load_config(self.project)
        data, metadata = self.format(coords, confs, bodyparts)
        pca = kpms.fit_pca(**data, **self.config)
        model = kpms.init_model(data, pca=pca, seed=jax.random.PRNGKey(s["seed"]), **self.config)
        return data, metadata, model

    def own_sigmasq_loc(self, data):
        return float(self.api.estimate_sigmasq_loc(data["Y"], data["mask"], filter_size=self.config["fps"]))

    def fit(self, model, data, metadata, n_sweeps, ar_only):
        if n_sweeps <= 0:
            return model
        # the reference runs num_iters - start_iter + 1 sweeps (model spec 11)
        return self.api.fit_model(model, data, metadata, num_iters=n_sweeps - 1, ar_only=ar_only,
                                  save_every_n_iters=None, generate_progress_plots=False)[0]

    def syllables(self, model, metadata):
        results = self.api.extract_results(model, metadata, save_results=False)
        return {k: v["syllable"] for k, v in results.items()}

    def apply(self, model, data, metadata, n_iter):
        return self.api.apply_model(model, data, metadata, num_iters=n_iter, save_results=False,
                                    **{k: v for k, v in self.config.items() if k != "num_iters"})

    def marginals(self, model, data, metadata, kwargs):
        return self.api.estimate_syllable_marginals(model, data, metadata, **kwargs, **self.config)


def _import_stand_ins():
    """Stand-ins for the packages named in ``KPMS_BENCH_STAND_INS`` (comma-separated) that are not
    installed (``_import_stand_ins.py``: the GPU machine's reference install); the ones used."""
    names = [n.strip() for n in os.environ.get("KPMS_BENCH_STAND_INS", "").split(",") if n.strip()]
    if not names:
        return []
    import _import_stand_ins

    return _import_stand_ins.install(names)


def _jax_versions():
    import jax
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "x64": bool(jax.config.jax_enable_x64)}


def _device_info():
    """JAX's backend and device, read after the timed stages (reading them starts the backend)."""
    import jax

    device = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device))}


def _device_peak_gb():
    """Peak memory in use on the default device, where the backend reports it (GPUs do; the CPU does not)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001  (backends without memory statistics)
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1024**3


if __name__ == "__main__":
    main()
