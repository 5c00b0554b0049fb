"""``python -m AnkleFractureLib`` is the ``ankle-fracture`` command."""

from AnkleFractureLib.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
