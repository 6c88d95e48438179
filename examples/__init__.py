"""Runnable models and training scripts for fsc (a development package, never installed
with the wheel): ``examples.hstu`` is the HSTU generative recommender that the demo, the
benchmarks, the simulator and the tests drive. Importable from a checkout whose editable
install (``make setup``) puts the checkout on the path."""
