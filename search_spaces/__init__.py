"""Search spaces as data: one `<method>.yaml` per method, shipped as package data and read
with `importlib.resources` (an `__init__.py` so that works in editable installs too)."""
