"""A sweep, from the configuration to stored records.

``config`` (benchmark.toml, suites, models, method options) -> ``plan`` (the cells and their ids,
no files touched) -> ``runner`` (the sweep: resumable, one process or torchrun / submitit ranks,
``distributed``) -> ``execute`` (one cell into a record) with ``cell`` (the one place a model is
built, its ``budget`` solved, calibrated by ``calibration`` when the method searches, patched and
placed) -> ``store`` (records written atomically) and ``run_summary`` (what the run printed).
"""
