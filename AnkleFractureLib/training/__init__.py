"""Training of the project's models.

* :mod:`AnkleFractureLib.training.seg_train` -- :func:`train_segmentation`, the tibia/fibula
  segmentation network (``ankle-fracture train-seg``).
* :mod:`AnkleFractureLib.training.seg_data` -- prepared cases, patch sampling, augmentation.
* :mod:`AnkleFractureLib.training.cls_train` -- :func:`train_classifier`, the Weber classifier
  (``ankle-fracture train-cls``): supervised, pseudo-label, FixMatch and the reference
  semi-supervised method.
* :mod:`AnkleFractureLib.training.semi_losses` -- prototypes, relation loss and weights, MMD,
  feature buffers, pseudo-label and FixMatch losses.
* :mod:`AnkleFractureLib.training.cls_augment` -- batched 3D crop augmentation (weak/strong).
* :mod:`AnkleFractureLib.training.distributed` -- ``torchrun`` / DistributedDataParallel helpers.

Nothing is imported here, so importing a sub-module does not pull in torch before it is needed.
"""

from __future__ import annotations
