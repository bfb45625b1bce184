"""Studies: each a module declaring its configuration, presets, run list,
execution and report, all run by the one runner (``runner.run_study``).

``STUDIES`` maps a study's name to its module; ``study(name)`` returns its
:class:`runner.Study` (modules are imported on first use: each pulls in
TensorFlow and the capabilities it needs).
"""

from __future__ import annotations

import importlib

STUDIES = {
    "transferability": "transfer_tf.studies.transferability",
    "off_the_shelf": "transfer_tf.studies.off_the_shelf",
    "autoencoder": "transfer_tf.studies.autoencoder",
    "what_transfers": "transfer_tf.studies.what_transfers",
    "fine_tuning": "transfer_tf.studies.fine_tuning",
    "domain_adaptation": "transfer_tf.studies.domain_adaptation",
}


def study(name: str):
    """The :class:`runner.Study` of a study name."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {sorted(STUDIES)}")
    return importlib.import_module(STUDIES[name]).STUDY
