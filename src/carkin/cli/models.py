"""carkin models: the library's models, one line each."""

from __future__ import annotations


def _cmd_models(args) -> int:
    from carkin.model.library import list_models

    models = list_models()
    if not models:
        print("no models found")
        return 0
    width = max(len(n) for n in models)
    for name, title in models.items():
        print(f"{name.ljust(width)}  {title}")
    return 0


def add_parser(sub, fmt) -> None:
    """Add this command's subparser to ``sub``."""
    p = sub.add_parser("models", help="list the models in the library",
                       description="List the models in the library with a one-line description each.")
    p.set_defaults(func=_cmd_models)
