"""The Modal backend: render a Plan into one readable Modal app, run it through the SDK, read its status, stop it.

    render.py       Plan → app.py source (the template `app.py.tmpl`, values entering only as literals)
    runtime.py      what the generated app imports inside its containers: the `.map` adapter, the TEI launcher
    launch.py       run / status / stop through the `modal` SDK (credentials checked before any network call)
"""
