"""A user's own package adding a backbone and a transfer task to imnet-ablate without touching it (the example of
docs/architecture.md, run by tests/test_plugins.py): put this folder on PYTHONPATH and pass
``hydra.searchpath=[pkg://toyplug.conf]``."""
