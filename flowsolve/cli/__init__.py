"""The ``flowsolve`` command (``demo | train | sample | likelihood | compare | transfer``) and
the demo's report on built-in data."""
