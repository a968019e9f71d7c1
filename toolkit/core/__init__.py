"""The run-time core: everything a board or a server needs at run time, nothing of the build side.

Nothing here knows which side runs it, and nothing here imports ``edge_runtime``,
``cloud_trainer`` or the build-side packages (``toolkit.build``, ``plan``,
``deploy``, ``lab``, ``cli``).
"""
