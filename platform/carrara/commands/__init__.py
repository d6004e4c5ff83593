"""Command groups of the `carrara` CLI; each module exposes a typer `app`."""
