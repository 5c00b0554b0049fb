"""Training of the project's models.

* :mod:`AnkleFractureLib.training.seg_train` -- :func:`train_segmentation`, the tibia/fibula
  segmentation network (``ankle-fracture train-seg``).
* :mod:`AnkleFractureLib.training.seg_data` -- prepared cases, patch sampling, augmentation.
* :mod:`AnkleFractureLib.training.distributed` -- ``torchrun`` / DistributedDataParallel helpers.

Nothing is imported here, so importing a sub-module does not pull in torch before it is needed.
"""

from __future__ import annotations
