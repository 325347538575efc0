"""crat's dashboard: workers and their load over time, running jobs and recent alerts.

Served by the crat process itself (twistd crat --web PORT) as a twisted.web resource tree:

    /               the page (HTML only: its script and style are separate resources, so
                    that the Content-Security-Policy can stay strict: default-src 'self')
    /app.js         the page's script
    /app.css        the page's style
    /favicon.svg    the page's icon
    /api/state      everything the page shows, as one JSON object
    /api/events     Server-Sent Events: one compact "update" per alert crat records

The page loads /api/state, then applies the updates of /api/events as they come (no
reload); when EventSource is missing or the stream fails it polls /api/state instead.

Modules: state (what the page shows, built from crat's records: pure, any clock),
events (the event stream and /api/state), web (the resource tree, its security headers,
the service); static/ holds the page, script, style and icon, shipped as package data
and read with importlib.resources.
"""
