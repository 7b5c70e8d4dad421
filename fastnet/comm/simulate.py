"""``python -m fastnet.comm.simulate``: runs :func:`fastnet.comm.planning.simulate.main`.

Importing names from here is deprecated: they moved to :mod:`fastnet.comm.planning.simulate`
(issue 38); removed in fastnet 0.3."""

from fastnet.comm._deprecated_paths import forward

__getattr__, __dir__ = forward(__name__, {
    "CostModel": "fastnet.comm.planning.cost_model",
    "IMAGENET_TRAIN": "fastnet.comm.planning.simulate",
    "Link": "fastnet.comm.planning.cost_model",
    "SimResult": "fastnet.comm.planning.simulate",
    "_schedule": "fastnet.comm.planning.simulate",
    "layer_profile": "fastnet.comm.planning.simulate",
    "main": "fastnet.comm.planning.simulate",
    "parse_link": "fastnet.comm.planning.simulate",
    "simulate": "fastnet.comm.planning.simulate",
    "simulate_plan": "fastnet.comm.planning.simulate",
})


if __name__ == "__main__":
    import sys

    from fastnet.comm.planning.simulate import main

    sys.exit(main())
