from .allo_keypoint_slds import AlloKeypointSLDS
from .arhmm import ARHMM
from .keypoint_slds import KeypointSLDS

__all__ = ["ARHMM", "AlloKeypointSLDS", "KeypointSLDS"]
