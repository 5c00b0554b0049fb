"""The ``ankle-fracture`` command line (also ``python -m AnkleFractureLib``)."""
