"""Deprecated path: moved to fastnet.comm.planning.autotune (issue 38); removed in fastnet 0.3."""

from fastnet.comm._deprecated_paths import forward

__getattr__, __dir__ = forward(__name__, {
    "Communicator": "fastnet.comm.communicators.base",
    "OnlineChooser": "fastnet.comm.planning.autotune",
    "size_class": "fastnet.comm.planning.autotune",
})
