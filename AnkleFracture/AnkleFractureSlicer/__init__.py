"""The Slicer side of AnkleFracture: MRML nodes in and out of the library, nothing else.

This package is imported by the module file ``AnkleFracture.py`` and by the tests. It needs
MRML (``slicer`` and ``vtk``: the Slicer application, or the ``slicer-core`` package from PyPI)
but never Qt, so the Logic runs and is tested without the application:

* :mod:`.terminology`: segment names, colours and SNOMED CT terminology of the bones.
* :mod:`.nodes`: volume, segmentation, transform, ROI, table and heatmap nodes from and to the
  library's :class:`~AnkleFractureLib.geometry.volume.Volume` (LPS<->RAS through
  :mod:`AnkleFractureLib.geometry.frames` only).
* :mod:`.background`: a pipeline stage or a training command in a separate process, polled
  (progress, cancel), so Slicer stays responsive.
* :mod:`.logic`: :class:`~.logic.AnkleFractureSceneLogic`, everything the panel does, on an
  explicit scene: Segment / Register / Classify / Run all (blocking, or in the background),
  results into nodes, export of a training case, training, batch.
* :mod:`.dependencies`: which Python packages are missing, and how to install them without
  replacing Slicer's own numpy or SimpleITK.
"""
