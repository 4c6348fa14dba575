"""jaxkd: self-supervised knowledge distillation (SSKD, HSAKD, EGA) in JAX/Flax."""

import os

# TensorFlow only feeds the input pipeline; its C++ start-up chatter would bury the progress line.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
