"""Board profiles (YAML, schema v1): the one source of truth, shipped in the wheel as data.

A package only so that the profiles install with hiertrain; nothing here is code.
``toolkit.core.artifacts.boards`` reads them through ``importlib.resources``
(``$HIERTRAIN_BOARDS`` overrides the directory).
"""
