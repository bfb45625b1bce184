"""transfer_tf: measure and exploit how well learned features transfer between tasks.

Modules, in the order data flows: ``data`` (dataset specs, class splits, tf.data),
``models`` (base nets with layers conv1..fc8, transfer nets), ``training`` (one
``train()`` for every experiment), ``export`` (SavedModel and .keras), ``results``
(crash-safe result files).
"""

import os

# TensorFlow's C++ start-up chatter (oneDNN notices, CUDA probes) drowns the
# experiments' own progress lines (set TF_CPP_MIN_LOG_LEVEL=0 to see it).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
