"""Deprecated path: moved to fastnet.comm.planning.buckets (issue 38); removed in fastnet 0.3."""

from fastnet.comm._deprecated_paths import forward

__getattr__, __dir__ = forward(__name__, {
    "plan_buckets": "fastnet.comm.planning.buckets",
})
