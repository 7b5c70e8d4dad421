"""Deprecated path: moved to fastnet.comm.planning.cost_model (issue 38); removed in fastnet 0.3."""

from fastnet.comm._deprecated_paths import forward

__getattr__, __dir__ = forward(__name__, {
    "CostModel": "fastnet.comm.planning.cost_model",
    "Link": "fastnet.comm.planning.cost_model",
    "MODELLED": "fastnet.comm.planning.cost_model",
    "RUNNABLE": "fastnet.comm.planning.cost_model",
    "_LEVELS": "fastnet.comm.planning.cost_model",
    "_link_coefficients": "fastnet.comm.planning.cost_model",
    "_shape": "fastnet.comm.planning.cost_model",
    "calibrate": "fastnet.comm.planning.cost_model",
    "coefficients": "fastnet.comm.planning.cost_model",
    "steps": "fastnet.comm.planning.cost_model",
})
