from .arhmm import ARHMM
from .keypoint_slds import KeypointSLDS

__all__ = ["ARHMM", "KeypointSLDS"]
