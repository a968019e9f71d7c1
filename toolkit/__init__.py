"""hiertrain toolkit: what the two runtimes share, and the build side.

``toolkit.core`` is the run-time core that ``edge_runtime`` (the board) and
``cloud_trainer`` (the server) import, and the only part they may import:
``protocol`` (wire format, codecs, messages, topics, modes), ``transport`` (MQTT,
serial, shaping, signing), ``artifacts`` (manifest, board profiles, safe loading,
atomic writes), ``models`` (definitions, split points, segments, exits, the edge
step and the rewrites it runs), ``data`` and the ExecuTorch program loader.

The rest runs only behind the ``toolkit`` CLI: ``build`` (export, lowering,
parity), ``plan`` (profiling, runtime model, planner), ``deploy`` (bundle, flash,
gateway), ``lab`` (brokers, process launcher, demo, bench) and ``cli``. The rule is
written as import-linter contracts in ``pyproject.toml`` and checked by the tests.
"""

__version__ = "0.1.0"
