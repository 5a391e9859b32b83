"""Everything the command line prints: tables, progress, summaries and the dry run's estimate.

    console.py    the plan, a run's status and its summary, as tables on a terminal and plain lines when piped
    progress.py   live progress of a run, from the orchestrator's events
    estimate.py   the dry run

Nothing below the CLI imports this package: commands return results, and the CLI hands them here.
"""
