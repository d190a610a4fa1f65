"""The command line: the main job on generated data and on real pose files (tiny settings)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from kpms_estimators.cli import main


def test_demo_writes_results(tmp_path, capsys):
    out = tmp_path / "demo.nc"
    assert main(["demo", "--recordings", "2", "--frames", "300", "--iters", "2", "--ar-iters", "2",
                 "--latent-dim", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Fitted KeypointSLDS: 4 Gibbs iterations (2 AR-only, 2 full)" in text
    assert "Median syllable duration:" in text and " ms at 30 fps" in text
    with xr.open_dataset(out) as ds:
        assert list(ds["recording"].values) == ["rec0", "rec1"]
        assert ds["syllable"].shape == (2, 300) and np.all(ds["syllable"].values >= 0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fit_real_files(real_data_dir, tmp_path, capsys):
    out = tmp_path / "res.nc"
    assert main(["fit", str(real_data_dir / "deepof_topview_dlc"), "--iters", "2", "--ar-iters", "2",
                 "--fps", "30", "--out", str(out)]) == 0
    assert "Loaded 2 file(s)" in capsys.readouterr().out
    with xr.open_dataset(out) as ds:
        assert ds.sizes["recording"] == 2 and int(ds["n_frames"].max()) == 451
