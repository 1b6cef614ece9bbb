"""The pieces of the ``lightning-compress`` command that pull in heavy imports."""
