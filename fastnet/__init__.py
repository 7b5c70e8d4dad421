"""fastnet: large-batch, mixed-precision, data-parallel training for PyTorch.

Reproduces Jia et al. 2018 ("Highly Scalable Deep Learning Training System with Mixed-Precision:
Training ImageNet in Four Minutes") and LARS (You et al. 2017) with Goyal et al.'s linear scaling
and warm-up. ``import fastnet`` needs only torch; optional backends load lazily.
"""

__version__ = "0.1.0"
