"""transfer_tf: measure and exploit how well learned features transfer between tasks.

Capabilities, in the order data flows: ``data`` (dataset specs, class splits,
tf.data), ``models`` (base nets with layers conv1..fc8, transfer nets),
``training`` (one ``train()`` for every experiment), ``precision`` (the measured
choice of precision and XLA), ``cache`` (exact activation caching), ``features``
(layer outputs), ``backbones`` (Keras Applications), ``heads`` (linear probes),
``autoencoder``, ``export``, ``results`` (crash-safe files), ``plots``. Studies
built on them live in ``transfer_tf.studies``, all run by one runner.

Importing the package sets one piece of global state, before anything imports
TensorFlow: the CPU settings TensorFlow reads at import (oneDNN kernels, thread
pools), from what was measured on this machine, unless the user set them
(``transfer_tf.onednn``). Logging is set up by the scripts.
"""

from transfer_tf import onednn as _onednn

__version__ = "0.2.0"

_onednn.bootstrap()
