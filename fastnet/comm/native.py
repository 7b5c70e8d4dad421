"""Deprecated path: moved to fastnet.comm.gradients.native (issue 38); removed in fastnet 0.3."""

from fastnet.comm._deprecated_paths import forward

__getattr__, __dir__ = forward(__name__, {
    "GradientSync": "fastnet.comm.gradients.native",
    "NativeAllReduce": "fastnet.comm.gradients.native",
})
