"""``medpeft benchmark``: sweeps over data sets x backbones x methods x label fractions x seeds.

    grid.py       the experiment (CLI / YAML / preset), validated, expanded into cells
    space.py      the hyper-parameter search space of each method
    hpo.py        Optuna TPE sampling and ASHA-style pruning, deterministic given the history
    store.py      the SQLite results store (one row per trial and per final run)
    jobs.py       one training job (what a worker runs), with the data cache
    executors.py  local (sequential) and Ray executors
    sweep.py      the driver: schedules jobs cell by cell, writes the store, shows progress
    report.py     tables, plots, Markdown and HTML report, leaderboard
    presets.py    named experiments (``--preset quick``)
    cli.py        the ``benchmark`` and ``report`` sub-commands
"""
