"""What differs per ``--mode`` in the cloud, as strategy objects the one training loop holds.

``base`` (the interface, with ht's answers as defaults), ``ht``, ``split`` (gradients
back to the edges) and ``upload`` (``--mode cloud``: the whole network on uploaded
images); ``registry`` maps a mode name to its strategy. The loop and the learner
(``cloud_trainer.loop``, ``cloud_trainer.learner``) know only ``base``, so adding a mode
touches no loop code.
"""
