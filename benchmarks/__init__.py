"""kphi3-kernels' benchmark suite.

``python -m kphi3_bench.run`` (``kphi3-bench``) sweeps the grouped layers; read in this order:
``shapes.py`` (the shape table, FLOP and byte counts) -> ``providers.py`` (what is compared) ->
``parity.py`` (the gate before timing) -> ``timing.py`` / ``memory.py`` (how it is measured) ->
``roofline.py`` (what it is measured against) -> ``sweep.py`` (the loop) -> ``report.py`` (the
result rows, tables, JSON, plots) -> ``run.py`` (the command line: ``kphi3-bench``, ``kphi3-bench
model``, ``kphi3-bench plot``; it imports torch only once a command runs, so that ``--help`` is
instant). ``model_bench.py`` times whole models;
``gpu_check.py`` is the one script to run on a machine with a GPU; ``results_readme.py`` writes
the tables of ``results/README.md`` from the committed results; ``test_bench_*.py`` is the
pytest-benchmark suite (``pytest benchmarks --benchmark-only``).
"""
