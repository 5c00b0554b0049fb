"""AnkleFractureLib: the pure-Python science behind the AnkleFracture 3D Slicer extension.

The package is laid out the way the pipeline runs::

    errors, geometry      lowest layer: exceptions, the Volume type, LPS/RAS frames
    io                    reading CT (DICOM, NIfTI, NRRD, MetaImage) and writing outputs atomically
    preprocessing         HU windowing, resampling, canonical orientation
    phantom               the synthetic ankle CT phantom (demo, training data, test fixture)
    dataset               the on-disk dataset layout shared by training and annotation export
    cli                   the ``ankle-fracture`` command line

It never imports slicer, qt, ctk or vtk.
"""

from __future__ import annotations

__version__ = "0.1.0"
