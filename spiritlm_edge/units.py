"""``spiritlm_edge.units``: the speech-unit protocol (implemented in ``runtime/units.py``)."""

from spiritlm_edge.runtime.units import *  # noqa: F401,F403
from spiritlm_edge.runtime.units import __all__  # noqa: F401
