"""The attachment forms the engine knows beyond the four site hooks of `host.py`: each module holds
one form's machinery, and methods only configure it (DESIGN.md's table of forms)."""
