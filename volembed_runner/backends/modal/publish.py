"""`volembed-run push` for a Modal run: call the generated app's `push` function, which uploads from the Volume.

The laptop renders the app (with the push's Secret), runs it ephemerally and calls `push.remote`: the files go from
the Volume to the Hub inside Modal, never through this machine.
"""

from __future__ import annotations

from dataclasses import replace

from volembed_runner.backends.modal import render
from volembed_runner.backends.modal.launch import _modal_errors, build_dir, import_app, require_credentials
from volembed_runner.plan import HubSettings, Plan
from volembed_runner.publish import Pushed

PUSH_APP = "push-app.py"  # beside the run's app.py, which a detached run's `stop` still refers to


def push_on_modal(plan: Plan, hub: HubSettings) -> Pushed:
    """Run the app's `push` function for `hub` on Modal and return what it pushed."""
    require_credentials()
    import modal

    plan = replace(plan, hub=hub)
    module = import_app(render.write_app(plan, build_dir(plan) / PUSH_APP))
    with _modal_errors(f"push {plan.name} to {hub.repo}"), modal.enable_output(), module.app.run():
        result = module.push.remote(hub.repo, hub.private, hub.license or "")
    return Pushed(**result)
