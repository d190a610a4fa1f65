"""kpms_estimators: keypoint-MoSeq models as scikit-learn estimators on a functional JAX core."""

from ._estimators import ARHMM, AlloKeypointSLDS, KeypointSLDS

__version__ = "0.1.0.dev0"

__all__ = ["ARHMM", "AlloKeypointSLDS", "KeypointSLDS", "__version__"]
