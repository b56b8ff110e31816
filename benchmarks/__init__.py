"""kphi3-kernels' benchmark suite.

``python -m kphi3_bench.run`` (``kphi3-bench``) sweeps the grouped layers; read in this order:
``shapes.py`` (the shape table, FLOP and byte counts) -> ``providers.py`` (what is compared) ->
``parity.py`` (the gate before timing) -> ``timing.py`` / ``memory.py`` (how it is measured) ->
``roofline.py`` (what it is measured against) -> ``sweep.py`` (the loop) -> ``report.py`` (the
result rows, the summary, tables, JSON, plots) -> ``cli.py`` (every subcommand's options and the
checks that need no torch, so that ``--help`` and usage errors are instant) -> ``run.py`` (the
``kphi3-bench`` command: the sweep, and the dispatch to ``model``, ``plot`` and ``ledger``).
``model_bench.py`` times whole models; ``ledger.py`` predicts the H200 cost of every launch and
of a decoder layer (``--model``), from the costs of ``ledger_costs.py``; ``compile_report.py``
lists every launch to compile for a GPU on the CPU, ``sass.py`` compiles one and reads its SASS;
``gpu_check.py`` is the one script to run on a machine with a GPU; ``results_readme.py`` writes
the tables of ``results/README.md`` from the committed results; ``test_bench_*.py`` is the
pytest-benchmark suite (``pytest benchmarks --benchmark-only``).
"""
